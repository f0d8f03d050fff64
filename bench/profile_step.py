"""Where a training step's time goes: torch.profiler over a few SGD steps of one model on
synthetic part shapes (B=16 x 2048 by default), the top operations by self time.

    python bench/profile_step.py --model pt_seg_tiny --device cuda [--amp]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import synchronize  # noqa: E402
from bench.run import build_pt, train_step  # noqa: E402
from lib import heap  # noqa: E402
from lib.cli import resolve_device  # noqa: E402
from lib.data import build_dataset  # noqa: E402
from lib.haq.policy_eval import cached_batches  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pt_seg_tiny")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    # a CPU step faults in new heap memory for its first 4-5 steps (lib/heap.py): profiled
    # before then, the kernels that first write each large tensor look 2x slower than they are
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--data-root", default=None)
    return parser


def main(args):
    device = resolve_device(args.device)
    heap.keep_freed_memory(device)  # as pretrain.py: the step's temporaries reused, not re-faulted
    dataset = build_dataset("synthetic_parts", args.data_root, "train", num_points=args.num_points)
    batch = cached_batches(dataset, list(range(args.batch_size)), args.batch_size, device)[0]
    step = train_step(build_pt(args.model, dataset, device), batch, "partseg")
    for _ in range(args.warmup):  # allocator, cuDNN/cuBLAS handles, Triton compilation
        step(args.amp)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(args.amp)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
