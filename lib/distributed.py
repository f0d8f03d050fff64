"""DDP plumbing for `torchrun`: NCCL on CUDA, gloo on CPU; a plain process without torchrun is
world size 1 and none of this does anything."""
import os

import torch
import torch.distributed as dist


def init_distributed(device):
    """Join the process group when started by torchrun. Returns (rank, world_size, device):
    on CUDA each rank takes the GPU of its local rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def gather_objects(obj):
    """All ranks' `obj` as a list (rank order); [obj] without DDP."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank (pickled); `obj` itself without DDP."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module, src=0):
    """Every parameter and buffer of `module` set to rank `src`'s, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


class ShardedSampler(torch.utils.data.Sampler):
    """Indices of one rank. Training: a permutation seeded by (seed, epoch), cut to a multiple of
    the world size so every rank takes the same number of steps; rank r takes every world-th
    index, so the ranks' batches at step s together are the single-process batch s.
    Evaluation (shuffle=False): rank r takes indices r, r + world, ... with no padding, so
    every sample is evaluated exactly once across ranks."""

    def __init__(self, n, shuffle, seed=0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        if not self.shuffle:
            return list(range(self.n))[rank()::world_size()]
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = order[:len(order) - len(order) % world_size()]
        return order[rank()::world_size()]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())
