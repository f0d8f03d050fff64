"""How much of a CPU training step is matrix products: the floor under any implementation.

The Point Transformer and PCT run the same Linear layers whatever implements them (Pointcept's
PTv1 and PCT_Pytorch included): every (rows, C_in) x (C_in, C_out) product of the forward and
its two of the backward. This times each aten operation of a few training steps (fast path,
fp32, the training scripts' optimizer) and sums the dense products (mm, addmm, bmm, baddbmm),
so that
    step_ms / gemm_ms
is the most that any implementation computing those products at this machine's GEMM rate
could gain over this one, and a speedup target against a peer is reachable only below
    (peer's step / this step) x step_ms / gemm_ms.
The GEMM rate is put beside a large square product's (MKL's best case on this machine). As
many steps again time the calls into lib/ops' C kernels by kernel (`c_kernel_ms`,
`c_kernels`), so that the step splits into products, kernels and the rest (the other
operators, autograd and Python).

    python bench/gemm_share.py --json OUT              # pt_seg B=8 x 2048, pct_cls B=32 x 1024
    python bench/gemm_share.py --quick --json OUT      # small sizes, seconds (tests)
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine_info  # noqa: E402
from bench.run import build_pct, build_pt, train_step  # noqa: E402
from lib import heap  # noqa: E402
from lib.ops import native  # noqa: E402
from lib.data import build_dataset  # noqa: E402
from lib.haq.policy_eval import cached_batches  # noqa: E402

GEMMS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.addbmm"}
# model -> (batch, points, task) at the settings: ShapeNet part for the PT, ModelNet's
# 1,024 points for PCT; quick: sizes a test runs in seconds
SETTINGS = {"full": {"pt_seg": (8, 2048, "partseg"), "pct_cls": (32, 1024, "cls")},
            "quick": {"pt_seg_tiny": (2, 256, "partseg"), "pct_cls": (2, 512, "cls")}}


def gemm_flops(name, shapes):
    """Multiply-adds x 2 of a dense product, from its operands' shapes."""
    if name in ("aten.addmm", "aten.baddbmm", "aten.addbmm"):
        shapes = shapes[1:]  # the added term first
    a, b = shapes[:2]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


class OpTimer(TorchDispatchMode):
    """Wall time and count of each aten operation, keyed by (name, operand shapes)."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls = collections.defaultdict(float), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        key = (str(func.overloadpacket),
               tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return result


class KernelTimer:
    """Wall time of each lib/ops C kernel called inside the block, by kernel name."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)

    def __enter__(self):
        self.call = native.Kernels.call
        timer = self

        def timed_call(kernels, name, **arguments):
            start = time.perf_counter()
            status = timer.call(kernels, name, **arguments)
            timer.seconds[name] += time.perf_counter() - start
            return status
        native.Kernels.call = timed_call
        return self

    def __exit__(self, *exc):
        native.Kernels.call = self.call


def training_step(name, batch_size, points, task, data_root):
    """fn() -> one fp32 training step of `name` on synthetic part shapes (bench/run.py's)."""
    dataset = build_dataset("synthetic_parts", data_root, "train", num_points=points)
    batch = cached_batches(dataset, list(range(batch_size)), batch_size, torch.device("cpu"))[0]
    if task == "cls":
        batch = dict(batch, label=batch["category"])
        model = build_pct(dataset, torch.device("cpu"))
    else:
        model = build_pt(name, dataset, torch.device("cpu"))
    step = train_step(model, batch, task)
    return lambda: step(False)


def square_gemm_rate(size, repeats=5):
    """GFLOP/s of a (size, size) x (size, size) fp32 product, best of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(step, steps):
    """Plain step times, then the per-operation times of `steps` steps under OpTimer."""
    for _ in range(2):  # warm-up: allocator, kernels' first calls
        step()
    plain = [_seconds(step) for _ in range(steps)]
    timer = OpTimer()
    with timer:
        step()
        timer.seconds.clear(), timer.calls.clear()
        timed = [_seconds(step) for _ in range(steps)]
    kernels = KernelTimer()  # steps of their own: the operator timer's Python slows the kernels
    with kernels:
        step()
        kernels.seconds.clear()
        kernel_timed = [_seconds(step) for _ in range(steps)]
    gemm = {k: v for k, v in timer.seconds.items() if k[0] in GEMMS}
    gemm_s = sum(gemm.values()) / steps
    flops = sum(gemm_flops(*k) * timer.calls[k] for k in gemm) / steps
    step_s = statistics.median(plain)
    top = sorted(gemm.items(), key=lambda kv: -kv[1])[:12]
    return {"step_ms": step_s * 1e3, "step_ms_samples": [s * 1e3 for s in plain],
            "step_ms_under_op_timer": statistics.median(timed) * 1e3,
            "op_ms": sum(timer.seconds.values()) / steps * 1e3,
            "gemm_ms": gemm_s * 1e3, "gemm_share": gemm_s / step_s,
            "gemm_gflop": flops / 1e9, "gemm_gflops_rate": flops / gemm_s / 1e9,
            "most_any_implementation_gains": step_s / gemm_s,
            "step_ms_under_kernel_timer": statistics.median(kernel_timed) * 1e3,
            "c_kernel_ms": sum(kernels.seconds.values()) / steps * 1e3,
            "c_kernels": {name: s / steps * 1e3 for name, s in
                          sorted(kernels.seconds.items(), key=lambda kv: -kv[1])},
            "largest_gemms": [{"op": k[0], "shapes": k[1], "calls": timer.calls[k] / steps,
                               "ms": v / steps * 1e3} for k, v in top]}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, metavar="OUT")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data-root", default=None)
    return parser


def main(args):
    heap.keep_freed_memory(torch.device("cpu"))  # as pretrain.py
    settings = SETTINGS["quick" if args.quick else "full"]
    results = {"machine": machine_info(torch.device("cpu")),
               "command": " ".join([os.path.join("bench", "gemm_share.py")] + sys.argv[1:]),
               "square_gemm_gflops": square_gemm_rate(256 if args.quick else 2048),
               "models": {}}
    for name, (batch_size, points, task) in settings.items():
        figures = measure(training_step(name, batch_size, points, task, args.data_root),
                          args.steps)
        figures["settings"] = {"batch": batch_size, "points": points, "dtype": "fp32",
                               "threads": torch.get_num_threads(), "optimizer": "adamw"}
        results["models"][name] = figures
        print(f"{name} B={batch_size} x {points}: step {figures['step_ms']:.0f} ms, GEMMs "
              f"{figures['gemm_ms']:.0f} ms ({figures['gemm_share']:.0%}, "
              f"{figures['gemm_gflop']:.1f} GFLOP at {figures['gemm_gflops_rate']:.0f} GFLOP/s; "
              f"square product {results['square_gemm_gflops']:.0f}): at most "
              f"{figures['most_any_implementation_gains']:.2f}x for any implementation; "
              f"C kernels {figures['c_kernel_ms']:.0f} ms",
              flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
