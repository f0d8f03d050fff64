"""DDP plumbing for `torchrun`: NCCL on CUDA, gloo on CPU; a plain process without torchrun is
world size 1 and none of this does anything.

pretrain.py and finetune.py train through `wrap_model` (BatchNorm synchronised across ranks,
then DistributedDataParallel) and shard every loader with `ShardedSampler`; evaluation runs on
every rank over its own shard and the metric accumulators are merged (lib/train.evaluate), so
each sample is scored exactly once and every rank ends with the same figures.
"""
import ctypes
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device):
    """Join the process group when started by torchrun. Returns (rank, world_size, device):
    on CUDA each rank takes the GPU of its local rank."""
    if not launched_by_torchrun():
        if device.type == "cuda" and device.index is not None:
            # --device cuda:1: the current device too, whose generator is the one a last.pt
            # saves and a resume sets (lib/checkpoint.rng_state), and where torch allocates
            torch.cuda.set_device(device)
        return 0, 1, device
    end_with_launcher()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


_PR_SET_PDEATHSIG = 1  # prctl(2)


def end_with_launcher():
    """Have the kernel send this torchrun worker SIGTERM when its launcher (torchrun's agent, its
    parent) ends, on Linux. torchrun starts each worker in a session of its own, so a kill of
    the launcher's process group (kill -9, a closed terminal's hang-up) used to leave the workers
    training, holding the run folder whose lock then refused the resume; now they end with it,
    as one killed process would, and the run resumes from its last checkpoint. Only under
    torchrun (its agent exports TORCHELASTIC_RUN_ID): a worker another launcher starts keeps
    running after its parent (a shell that exits after `nohup ... &`)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # it ended before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def launched_by_torchrun():
    """Whether torchrun started this process: it sets RANK and WORLD_SIZE both. A WORLD_SIZE
    alone (exported in the user's shell, or given to lib.stage_status by run/recipes.sh) starts
    no process group: the process runs alone."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size():
    """The number of processes this one runs among, known before init_distributed: torchrun's
    WORLD_SIZE, or 1 for a process it did not start."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


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


def same_on_every_rank(path, read, key, writer, tries=3):
    """read() of the file `path` on every rank, again until every rank's key(result) is one
    value, not None: each rank opens the file itself, and `writer` ("a run", "a search"), still
    writing it, may replace it between two ranks' reads. Returns the result; a one-line
    ValueError (on every rank) when the ranks disagreed `tries` times in a row."""
    for _ in range(tries):
        result = read()
        keys = gather_objects(key(result))
        if keys[0] is not None and keys.count(keys[0]) == len(keys):
            return result
    raise ValueError(f"{path}: replaced while the processes read it, {tries} times in a row "
                     f"({writer} still writing it?); start again when it is written")


def broadcast_tensor_(tensor, src=0):
    """`tensor` set in place to rank `src`'s (the same shape and dtype on every rank; on the
    evaluation device, which NCCL needs). Returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def wrap_model(model, device):
    """The model as it trains under torchrun: every BatchNorm synchronised across ranks (so N
    processes with batch B normalise like one process with batch N*B), inside DDP. On CUDA,
    torch's SyncBatchNorm; on the CPU (gloo), where torch's refuses CPU tensors, CpuSyncBatchNorm.
    Without torchrun, the model itself. Parameters are kept, not copied: build the optimizer
    after wrapping or before, either works."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(convert_cpu_sync_batchnorm(model))


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients: every rank's loss
    depends on every rank's input through the shared statistics."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of all ranks' batches together (mean,
    then the biased variance around it, each one all_reduce), for gloo on the CPU. Evaluation
    uses the running statistics and talks to no other rank, so ranks may evaluate shards of
    different sizes. Same parameters and buffers as BatchNorm1d: checkpoints do not change."""

    def forward(self, x):  # (M, C) or (B, C, L)
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(x.numel() // x.shape[1])
        dist.all_reduce(count)  # rows of all ranks; no gradient
        n = int(count)
        # Statistics in fp32 at least (under bf16 autocast too, as BatchNorm's own), fp64 kept.
        xf = x if x.dtype == torch.float64 else x.float()
        mean = _SumOverRanks.apply(xf.sum(dims)) / n  # (C,)
        centred = xf - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n  # biased, as BN's
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(
                    self.running_var.dtype), momentum)
        return y.to(x.dtype)


def convert_cpu_sync_batchnorm(module):
    """Every nn.BatchNorm1d in `module` (a plain one, not a subclass) swapped for a
    CpuSyncBatchNorm holding the same parameter and buffer tensors."""
    if type(module) is nn.BatchNorm1d:
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                  module.affine, module.track_running_stats)
        synced._parameters, synced._buffers = module._parameters, module._buffers
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_cpu_sync_batchnorm(child))
    return module


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank (pickled); `obj` itself without DDP."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module, src=0):
    """Every parameter and buffer of `module` set to rank `src`'s, in place."""
    _broadcast(list(module.parameters()) + list(module.buffers()), src)


def broadcast_buffers(module, src=0):
    """Every buffer of `module` (BatchNorm's running statistics) set to rank `src`'s, in place."""
    _broadcast(list(module.buffers()), src)


def _broadcast(tensors, src):
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


def cleanup():
    if is_distributed():
        # every rank arrives first: a rank tearing gloo down while another still works (rank 0
        # writing its files) can abort ("terminate called without an active exception", exit
        # code -6: seen once in tests/test_distributed.py, in the sixth CI run of a day)
        dist.barrier()
        dist.destroy_process_group()


class ShardedSampler(torch.utils.data.Sampler):
    """Indices of one rank. Training: a permutation seeded by (seed, epoch), cut to a multiple of
    the world size so every rank takes the same number of steps; rank r takes every world-th
    index, so the ranks' batches at step s together are the single-process batch s.
    Evaluation (shuffle=False): the one-process batches of `batch_size` in order, rank r taking
    batches r, r + world, ... whole, with no padding: every sample is evaluated exactly once
    across ranks, and in the very batch (same neighbours, same size) one process puts it in, so
    its logits are one process's to the bit (a batch's size can change a kernel's sums: a crop
    alone differs from the same crop among four in its last bits)."""

    def __init__(self, n, shuffle, seed=0, batch_size=1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.batch_size = batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        if not self.shuffle:
            size = self.batch_size
            starts = range(rank() * size, self.n, world_size() * size)
            return [i for start in starts for i in range(start, min(start + size, self.n))]
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = order[:len(order) - len(order) % world_size()]
        return order[rank()::world_size()]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())
