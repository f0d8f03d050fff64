"""Where a CPU training step of a Point Transformer goes: forward, backward and optimizer time,
live and with the geometry replayed from a tape; the time of each FPS / kNN call; and the peak
memory of a process running the step on the fast and on the reference path.

    python bench/step_breakdown.py --model pt_seg_tiny --json OUT    # about a minute
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine_info, peak_memory_gib  # noqa: E402
from bench.run import build_pt  # noqa: E402
from lib import ops  # noqa: E402
from lib.ops import geometry  # noqa: E402
from lib.data import build_dataset  # noqa: E402
from lib.haq.policy_eval import cached_batches  # noqa: E402
from lib.tasks import model_inputs, supervised_loss  # noqa: E402
from lib.train import build_optimizer  # noqa: E402


def setup(model_name, batch_size, num_points):
    dataset = build_dataset("synthetic_parts", None, "train", num_points=num_points)
    batch = cached_batches(dataset, list(range(batch_size)), batch_size, torch.device("cpu"))[0]
    model = build_pt(model_name, dataset, torch.device("cpu")).train()
    return model, batch, build_optimizer(model.parameters(), "adamw", 1e-3, 1e-4)  # pretrain's


def split_step(model, batch, optimizer, tape):
    """One SGD step -> (forward, backward, optimizer) seconds; geometry from `tape` if given."""
    start = time.perf_counter()
    if tape is not None:
        with tape:
            loss = supervised_loss(model(*model_inputs(batch, "partseg")), batch)
    else:
        loss = supervised_loss(model(*model_inputs(batch, "partseg")), batch)
    forward = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    return forward - start, backward - forward, time.perf_counter() - backward


def geometry_calls(model, batch, optimizer, steps):
    """Mean ms per step of each distinct FPS / kNN call (by operation and shapes)."""
    spent = collections.defaultdict(float)
    originals = {name: getattr(geometry, name)
                 for name in ("farthest_point_sample_cpu", "knn_query_cpu")}

    def timed(name, fn):
        def call(*args):
            start = time.perf_counter()
            out = fn(*args)
            shapes = [tuple(a.shape) if torch.is_tensor(a) else a for a in args]
            spent[f"{name.split('_')[0]} {shapes}"] += time.perf_counter() - start
            return out
        return call
    try:
        for name, fn in originals.items():
            setattr(geometry, name, timed(name, fn))
        for _ in range(steps):
            split_step(model, batch, optimizer, None)
    finally:
        for name, fn in originals.items():
            setattr(geometry, name, fn)
    return {key: 1e3 * total / steps for key, total in sorted(spent.items(), key=lambda kv: -kv[1])}


def peak_probe(args):
    """Run in a fresh process: a few steps on one backend, then VmHWM."""
    ops.set_backend(args.peak_probe)
    model, batch, optimizer = setup(args.model, args.batch_size, args.num_points)
    for _ in range(3):
        split_step(model, batch, optimizer, None)
    print(json.dumps({"peak_gib": peak_memory_gib(torch.device("cpu"))}))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pt_seg_tiny", choices=["pt_seg_tiny", "pt_seg"])
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-probe", choices=["auto", "reference"], help=argparse.SUPPRESS)
    return parser


def main(args):
    if args.peak_probe:
        peak_probe(args)
        return
    if args.json is None:
        raise SystemExit("bench/step_breakdown.py: --json OUT is required")
    results = {"machine": machine_info(torch.device("cpu")), "model": args.model}
    model, batch, optimizer = setup(args.model, args.batch_size, args.num_points)
    tape = ops.GeometryTape()
    for label, step_tape in (("live", None), ("geometry_replayed", tape)):
        for _ in range(2):  # warm-up (and the tape's recording)
            split_step(model, batch, optimizer, step_tape)
        samples = [split_step(model, batch, optimizer, step_tape) for _ in range(args.steps)]
        medians = [1e3 * statistics.median(part) for part in zip(*samples)]
        results[label] = dict(zip(("forward_ms", "backward_ms", "optimizer_ms"), medians))
        print(f"{label:18s} forward {medians[0]:6.1f} ms  backward {medians[1]:6.1f} ms  "
              f"optimizer {medians[2]:4.1f} ms")
    results["geometry_ms"] = geometry_calls(model, batch, optimizer, args.steps)
    print(f"FPS and kNN: {sum(results['geometry_ms'].values()):.1f} ms a step")
    for backend in ("auto", "reference"):
        probe = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-probe",
                                backend, "--model", args.model, "--batch-size",
                                str(args.batch_size), "--num-points", str(args.num_points)],
                               capture_output=True, text=True, check=True)
        results[f"peak_gib_{backend}"] = json.loads(probe.stdout.splitlines()[-1])["peak_gib"]
        print(f"peak memory, {backend} path: {results[f'peak_gib_{backend}']:.2f} GiB")
    results["machine"]["loadavg_end"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", args.json)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
