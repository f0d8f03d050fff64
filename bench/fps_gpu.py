"""FPS on a CUDA device: the torch loop (lib.ops' reference) against lib/ops/fps_triton.py's one
launch, at a few launch shapes, each checked against the loop's picks; where they differ, the
first difference (a near tie?) and geometry.fps_shortfall of both.

    python bench/fps_gpu.py --json OUT

Times are medians of CUDA-event-timed calls after warm-up (the first call compiles the kernel).
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine_info  # noqa: E402
from lib.ops import fps_triton  # noqa: E402
from lib.ops import geometry  # noqa: E402

# (key, B, N, m): an object batch, a room, and a room-sized stage of the semseg network
CASES = [("fps_b16_2048_512", 16, 2048, 512), ("fps_b16_8192_2048", 16, 8192, 2048),
         ("fps_80000_20000", 1, 80000, 20000), ("fps_b8_24000_6000", 8, 24000, 6000)]
# launch shapes tried: resident clouds by warps per program, split ones by points per program
# (10**9: one program per cloud streaming all of its points)
RESIDENT_WARPS = (4, 8, 16)
SPLIT_SPANS = (1024, 2048, 4096, 10 ** 9)


def median_ms(fn, repeats):
    fn()  # warm-up: compilation, allocator
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def variants(n):
    """{name: settings of fps_triton} for a cloud of n points."""
    if n <= fps_triton.RESIDENT_MAX:
        return {f"resident_w{w}": {"_resident_warps": lambda block, w=w: w} for w in RESIDENT_WARPS}
    return {f"split_span{span}": {"SPLIT_SPAN": span} for span in SPLIT_SPANS}


def with_settings(settings, fn):
    saved = {name: getattr(fps_triton, name) for name in settings}
    for name, value in settings.items():
        setattr(fps_triton, name, value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(fps_triton, name, value)


def first_divergence(xyz, picks, reference):
    """Where two FPS sequences first differ, and whether that step was a tie: both candidates'
    squared distances to the points picked before (as the reference computes them, and in
    float64). None if they agree."""
    clouds = (picks != reference).any(1).nonzero()
    if not len(clouds):
        return None
    b = int(clouds[0])
    step = int((picks[b] != reference[b]).nonzero()[0])
    before, points = xyz[b, reference[b, :step]], xyz[b]
    found = {"cloud": b, "step": step}
    for name, at in (("triton", int(picks[b, step])), ("reference", int(reference[b, step]))):
        found[name] = {"index": at,
                       "dist2": float((before - points[at]).square().sum(-1).min()),
                       "dist2_f64": float((before.double() - points[at].double())
                                          .square().sum(-1).min())}
    return found


def bench_case(b, n, m, repeats):
    gen = torch.Generator().manual_seed(n)
    xyz = (torch.rand(b, n, 3, generator=gen) * torch.tensor([10.0, 10.0, 3.0])).cuda()
    start = geometry.start_index(xyz)
    reference = geometry.farthest_point_sample_reference(xyz, m)
    row = {"reference_ms": median_ms(lambda: geometry.farthest_point_sample_reference(xyz, m),
                                     max(1, repeats // 4))}
    for name, settings in variants(n).items():
        def run():
            return fps_triton.farthest_point_sample(xyz, m, start)
        picks = with_settings(settings, run)
        row[f"{name}_ms"] = with_settings(settings, lambda: median_ms(run, repeats))
        row[f"{name}_matches_reference"] = bool(torch.equal(picks, reference))
        if not row[f"{name}_matches_reference"]:
            row[f"{name}_divergence"] = first_divergence(xyz, picks, reference)
            row[f"{name}_shortfall"] = geometry.fps_shortfall(xyz, picks)
    row["reference_shortfall"] = geometry.fps_shortfall(xyz, reference)
    fastest = min((v for k, v in row.items() if k.endswith("_ms") and k != "reference_ms"
                   and row.get(k[:-3] + "_shortfall", 0) < 1e-6), default=None)
    row["speedup"] = row["reference_ms"] / fastest if fastest else None  # of the valid ones
    return row


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    return parser


def main(args):
    if not torch.cuda.is_available() or fps_triton.triton is None:
        raise SystemExit("bench/fps_gpu.py: needs a CUDA device and triton")
    results = {"machine": machine_info(torch.device("cuda")), "cases": {}}
    for key, b, n, m in CASES:
        results["cases"][key] = row = bench_case(b, n, m, args.repeats)
        print(key, json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v
                               for k, v in row.items()}), flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
