"""The Point Transformer's training step on CUDA, eager against CUDA-graph replay
(lib/cuda_graphs.py), fp32 and bf16 autocast, and whether the GPU or the host bounds each.

    python bench/graph_step.py --json OUT                  # on a GPU machine, about 2 minutes
    python bench/graph_step.py --json OUT --quick --device cpu   # a smoke test: eager only

Each step is lib.train's, with pretrain.py's optimizer (AdamW), on one fixed batch of synthetic
part shapes (B=16 x 2048 by default), on lib.ops' fast path and on its plain-PyTorch reference
(whose FPS loop only queues launches, so a user could replay it as a graph too), each eager and
replayed: like with like, the fast replay against the reference replay. For each path: shapes per
second from `--steps` back-to-back steps and one synchronisation (the median of `--rounds`
rounds, paths interleaved); the host's time to issue a step (the same steps without waiting
for the GPU: when it equals the wall time the host is what bounds the step); and the GPU's
kernel time per step from torch.profiler (busy = kernel time / wall time). An equivalence check
runs three SGD steps from one start on copies of one model, eagerly twice and replayed once,
and reports the largest differences of the losses, the first step's gradients and the final
weights: CUDA's index_add sums in no fixed order, so two eager runs differ by rounding too,
and the replay should differ from eager no more than eager differs from itself.
"""
import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine_info, settings, synchronize  # noqa: E402
from bench.run import PT_MODELS, PT_WIDTHS, build_pt, train_step  # noqa: E402
from lib import heap, ops  # noqa: E402
from lib.cli import resolve_device  # noqa: E402
from lib.cuda_graphs import GraphedTrainStep  # noqa: E402
from lib.data import build_dataset  # noqa: E402
from lib.haq.policy_eval import cached_batches  # noqa: E402
from lib.tasks import model_inputs, supervised_loss  # noqa: E402
from lib.train import autocast, build_optimizer  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["tiny", "default"], choices=PT_MODELS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="B=2 x 256, 2 steps, 1 round")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None)
    return parser


def on_backend(backend, step):
    """step() under this lib.ops backend (the capture of a replayed step included)."""
    ops.set_backend(backend)
    try:
        step()
    finally:
        ops.set_backend("auto")


def graphed_step(graphed, optimizer, batch):
    if graphed(batch) is None:
        raise RuntimeError("the step was not captured (see the warning above)")
    optimizer.step()


def host_and_wall(step, steps, device):
    """(host seconds to issue `steps` steps, wall seconds until the GPU has run them)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    issued = time.perf_counter() - start
    synchronize(device)
    return issued, time.perf_counter() - start


def kernel_seconds(step, steps, device):
    """GPU kernel time per step by torch.profiler (None on the CPU)."""
    if device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    total_us = 0.0
    for event in prof.key_averages():
        value = getattr(event, "self_device_time_total", None)
        if value is None:
            value = getattr(event, "self_cuda_time_total", 0.0)
        total_us += value
    return total_us / 1e6 / steps


def time_paths(paths, args, device, items):
    for step in paths.values():  # warm-up: allocator, Triton compilation, the graph's capture
        for _ in range(2):
            step()
    rounds = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, step in paths.items():
            rounds[name].append(host_and_wall(step, args.steps, device))
    figures = {}
    for name, samples in rounds.items():
        wall = statistics.median(w for _, w in samples) / args.steps
        host = statistics.median(h for h, _ in samples) / args.steps
        kernels = kernel_seconds(paths[name], 3, device)
        figures[name] = {"shapes_per_s": items / wall, "step_ms": wall * 1e3,
                         "host_issue_ms": host * 1e3,
                         "kernel_ms": None if kernels is None else kernels * 1e3,
                         "gpu_busy": None if kernels is None else kernels / wall,
                         "rounds_wall_s": [w for _, w in samples]}
    return figures


def equivalence(name, dataset, batch, device, steps=3):
    """`steps` SGD steps from one start: eager twice (CUDA's index_add sums in no fixed order,
    so two eager runs differ by rounding already) and replayed; the largest differences."""
    torch.manual_seed(0)
    models = {"eager": build_pt(name, dataset, device)}
    models["eager_again"] = copy.deepcopy(models["eager"])
    models["graphed"] = copy.deepcopy(models["eager"])
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
                  for k, m in models.items()}
    graphed = GraphedTrainStep(models["graphed"], supervised_loss, "partseg",
                               functools.partial(autocast, device, False, cache=False))
    losses = {k: [] for k in models}
    first_grads = {}
    for step in range(steps):
        for key, model in models.items():
            model.train()
            if key == "graphed":
                loss, _ = graphed(batch)
            else:
                loss = supervised_loss(model(*model_inputs(batch, "partseg")), batch)
                optimizers[key].zero_grad(set_to_none=True)
                loss.backward()
            losses[key].append(float(loss.detach()))
            if step == 0:
                first_grads[key] = [None if p.grad is None else p.grad.clone()
                                    for p in model.parameters()]
            optimizers[key].step()
    result = {"steps": steps, "losses": losses}
    scale = max(float(g.abs().max()) for g in first_grads["eager"] if g is not None)
    for other in ("eager_again", "graphed"):
        grad_gap = max(float((g - h).abs().max()) for g, h in
                       zip(first_grads["eager"], first_grads[other]) if g is not None) / scale
        state_gap = max(float((x - y).abs().max()) for x, y in
                        zip(models["eager"].state_dict().values(),
                            models[other].state_dict().values()) if x.is_floating_point())
        loss_gap = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses[other]))
        result[other] = {"first_grad_gap_of_largest": grad_gap, "final_state_abs_gap": state_gap,
                         "loss_rel_gap": loss_gap}
    return result


def main(args):
    device = resolve_device(args.device)
    if args.quick:
        args.batch_size, args.num_points, args.steps, args.rounds = 2, 256, 2, 1
    heap.keep_freed_memory(device)
    dataset = build_dataset("synthetic_parts", args.data_root, "train", num_points=args.num_points)
    batch = cached_batches(dataset, list(range(args.batch_size)), args.batch_size, device)[0]
    result = {"machine": machine_info(device), "figures": {}, "details": {}}
    for config in args.models:
        name = PT_MODELS[config]
        for amp in (False, True):
            dtype = "bf16" if amp else "fp32"
            paths, models = {}, []
            for backend, label in (("auto", ""), ("reference", "reference_")):
                model = build_pt(name, dataset, device).train()
                optimizer = build_optimizer(model.parameters(), "adamw", 1e-3, 1e-4)
                models.append((model, optimizer))
                paths[f"{label}eager"] = functools.partial(
                    on_backend, backend,
                    functools.partial(train_step(model, batch, "partseg", optimizer), amp))
                if device.type == "cuda":
                    graphed = GraphedTrainStep(model, supervised_loss, "partseg",
                                               functools.partial(autocast, device, amp,
                                                                 cache=False))
                    paths[f"{label}graphed"] = functools.partial(
                        on_backend, backend,
                        functools.partial(graphed_step, graphed, optimizer, batch))
            timing = time_paths(paths, args, device, args.batch_size)
            key = f"pt_{config}_train_{dtype}"
            result["details"][key] = {"settings": settings(
                args.batch_size, args.num_points, torch.get_num_threads(), [dtype], model=name,
                widths=PT_WIDTHS[config], optimizer="adamw"), "paths": timing}
            for path, figures in timing.items():
                result["figures"][f"{key}_{path}_shapes_per_s"] = figures["shapes_per_s"]
            speed = {path: figures["shapes_per_s"] for path, figures in timing.items()}
            result["figures"][f"{key}_eager_speedup"] = speed["eager"] / speed["reference_eager"]
            if "graphed" in timing:
                result["figures"][f"{key}_graph_speedup"] = speed["graphed"] / speed["eager"]
                result["figures"][f"{key}_graphed_speedup"] = (speed["graphed"]
                                                               / speed["reference_graphed"])
            print(key, json.dumps({p: {k: v for k, v in f.items() if k != "rounds_wall_s"}
                                   for p, f in timing.items()}), flush=True)
            del models, paths
        if device.type == "cuda":
            check = equivalence(name, dataset, batch, device)
            result["details"][f"pt_{config}_equivalence_fp32"] = check
            print(f"pt_{config} equivalence", json.dumps(check), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
