"""Reference vs fast CPU point operations, side by side.

    python bench/pointops.py --json OUT

Median wall time (ms) of FPS, kNN and 3-NN interpolation on object batches (B=16 x 2048) and on
a room-sized cloud (80k points) under both backends of lib/ops (geometry.py); a Point Transformer
part-segmentation training step (B=16 x 2048) under both backends; and a grouping-heavy
forward+backward and that training step in fresh processes under GLIBC_TUNABLES variants
(none, run/setup_env.sh's, and two candidates); and the two forms of lib/ops/csrc/geometry.c's
FPS against fpsample's bucket FPS over cloud sizes (for the record: lib.ops runs the C FPS at
every size, as fpsample's bucket FPS cannot start from a given point).
Prints tables and writes everything to OUT as JSON. The slow reference cases run once.
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine_info, peak_memory_gib, synchronize  # noqa: E402
from lib import ops  # noqa: E402
from lib.ops import geometry, native  # noqa: E402
from lib.cli import resolve_device  # noqa: E402

# The targets for the fast path on the 2-core development machine (ms).
TARGETS_MS = {"fps_b16_2048_512": 10, "fps_80000_20000": 100,
              "knn16_b16_2048": 25, "knn16_80000": 80}
SECTIONS = ("ops", "train", "malloc", "fps_sizes")
# (B, N) of the fps_sizes section, sampling N / 4
FPS_SIZES = [(16, 2048), (16, 4096), (4, 8192), (1, 16384), (1, 32768), (1, 80000)]
# The mmap/trim thresholds, the first part of what run/setup_env.sh exports
THRESHOLDS = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
# What run/setup_env.sh exports; used when this runs without it.
SETUP_ENV_TUNABLES = f"{THRESHOLDS}:glibc.malloc.hugetlb=1"


def median_ms(fn, repeats, device=torch.device("cpu")):
    """Median wall time of `repeats` calls, after a warm-up call unless it is a single run
    (on CUDA always: the first call compiles the Triton FPS); device work included."""
    if repeats > 1 or device.type == "cuda":
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def op_cases(device):
    """(key, what, call, reference repeats, fast repeats) on random clouds of the usual sizes."""
    gen = torch.Generator().manual_seed(0)
    objects = torch.randn(16, 2048, 3, generator=gen)  # random order: [:, :512] is a subsample
    object_feat = torch.randn(16, 512, 64, generator=gen)
    room = torch.rand(1, 80000, 3, generator=gen) * torch.tensor([10.0, 10.0, 3.0])  # metres
    room_feat = torch.randn(1, 20000, 64, generator=gen)
    objects, object_feat, room, room_feat = (t.to(device) for t in (objects, object_feat, room,
                                                                      room_feat))
    fps, knn, interpolate = ops.farthest_point_sample, ops.knn_query, ops.interpolate
    return [
        ("fps_b16_2048_512", "FPS B=16 2048->512", lambda: fps(objects, 512), 5, 20),
        ("fps_80000_20000", "FPS 80000->20000", lambda: fps(room, 20000), 1, 5),
        ("knn16_b16_2048", "kNN k=16 B=16 x 2048", lambda: knn(16, objects, objects), 3, 20),
        ("knn16_80000", "kNN k=16 80000", lambda: knn(16, room, room), 1, 5),
        ("interp3_b16_512_2048", "3-NN interp B=16 512->2048 C=64",
         lambda: interpolate(objects[:, :512], objects, object_feat), 3, 20),
        ("interp3_20000_80000", "3-NN interp 20000->80000 C=64",
         lambda: interpolate(room[:, :20000], room, room_feat), 1, 5),
    ]


def bench_ops(device):
    rows = []
    for key, what, call, reference_repeats, fast_repeats in op_cases(device):
        ops.set_backend("reference")
        reference = median_ms(call, reference_repeats, device)
        ops.set_backend("auto")
        fast = median_ms(call, fast_repeats, device)
        rows.append({"key": key, "what": what, "reference_ms": round(reference, 2),
                     "fast_ms": round(fast, 2), "speedup": round(reference / fast, 1),
                     "target_ms": TARGETS_MS.get(key) if device.type == "cpu" else None,
                     "repeats": {"reference": reference_repeats, "fast": fast_repeats}})
        print_op_row(rows[-1])
    return rows


def fps_form_kernels(folder):
    """{"plain": ..., "pruned": ...}: lib/ops/csrc/geometry.c copied twice into `folder` with
    FPS_TREE_MIN_POINTS set so that every cloud takes that form (the kernel chooses by size),
    each built by lib/ops/native.py (cached beside the main library, as fps_<form>-*.so)."""
    compiler = os.environ.get("CC", "cc")
    with open(os.path.join(native.SOURCE_DIR, "geometry.c")) as f:
        source = f.read()
    kernels = {}
    for form, threshold in (("plain", 2 ** 31), ("pruned", 0)):
        os.makedirs(os.path.join(folder, form))
        path = os.path.join(folder, form, "geometry.c")
        with open(path, "w") as f:
            f.write(re.sub(r"FPS_TREE_MIN_POINTS = \d+", f"FPS_TREE_MIN_POINTS = {threshold}",
                           source))
        shutil.copy(native.HEADERS[0], os.path.join(folder, form))
        kernels[form] = native.Kernels(native.build(compiler, [path], native.HEADERS,
                                                    name=f"fps_{form}"), [path])
    return kernels


def bench_fps_sizes():
    """FPS of N / 4 points over cloud sizes, uniform random clouds: lib/ops/csrc/geometry.c's
    two forms (the plain O(N m) loop and the loop pruned on a kd-split, which the kernel takes
    from FPS_TREE_MIN_POINTS points a cloud), each forced on every size, against fpsample's
    bucket FPS (QuickFPS, kd-tree height as fpsample suggests for N: log2(N) / 2 - 1; one cloud
    at a time). fpsample only for the record: its bucket FPS cannot start from a given point."""
    if native.library() is None:
        print("fps_sizes: no C library (no C compiler); skipped")
        return []
    import fpsample
    rows = []
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        kernels = fps_form_kernels(folder)
        for b, n in FPS_SIZES:
            xyz = torch.rand(b, n, 3, generator=gen)
            clouds, starts, m = xyz.numpy(), geometry.start_index(xyz), n // 4
            height = max(1, (n.bit_length() - 1) // 2 - 1)
            picks = {form: torch.empty(b, m, dtype=torch.int64) for form in kernels}

            def c_form(form):
                kernels[form].call("fps", B=b, N=n, m=m, xyz=xyz, start=starts, out=picks[form])

            times = {form: median_ms(lambda form=form: c_form(form), 3) for form in kernels}
            times["fpsample"] = median_ms(lambda: [fpsample.bucket_fps_kdline_sampling(
                cloud, m, height) for cloud in clouds], 3)
            rows.append({"b": b, "n": n, **{f"{k}_ms": round(v, 2) for k, v in times.items()},
                         "same_picks": torch.equal(picks["plain"], picks["pruned"])})
            print(f"FPS B={b} {n}->{m}: C plain {times['plain']:.1f} ms, C pruned "
                  f"{times['pruned']:.1f} ms, fpsample {times['fpsample']:.1f} ms, same picks: "
                  f"{rows[-1]['same_picks']}")
    return rows


def import_build_model():
    """models.build_model, or None while models/ (written alongside) does not import yet."""
    try:
        from models import build_model
    except ImportError:
        return None
    return build_model


def train_step(name):
    """One SGD step of part segmentation on B=16 x 2048 (random clouds and labels) with the
    model `name`, as a closure."""
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(16, 2048, 3, generator=gen) * 2 - 1
    feat = torch.randn(16, 2048, 3, generator=gen)
    category = torch.randint(16, (16,), generator=gen)
    label = torch.randint(50, (16, 2048), generator=gen)
    torch.manual_seed(0)
    model = import_build_model()(name, in_channels=3, num_classes=50, num_categories=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        logits = model(xyz, feat, category)  # (B, N, 50)
        loss = F.cross_entropy(logits.reshape(-1, 50), label.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def grouping_step():
    """Forward+backward dominated by neighbour tensors: gather (16, 2048, 16, 64), Linear, sum."""
    gen = torch.Generator().manual_seed(0)
    xyz = torch.randn(16, 2048, 3, generator=gen)
    idx, _ = ops.knn_query(16, xyz, xyz)  # (B, N, k)
    features = torch.randn(16, 2048, 64, generator=gen, requires_grad=True)
    linear = torch.nn.Linear(64, 64)
    return lambda: linear(ops.gather(features, idx)).sum().backward()


def bench_train_step(steps):
    if import_build_model() is None:
        return {"skipped": "models.build_model does not import yet"}
    rows = []
    for name in ("pt_seg", "pt_seg_tiny"):
        step = train_step(name)
        row = {"model": name, "steps": steps}
        for backend, key in (("reference", "reference_ms"), ("auto", "fast_ms")):
            ops.set_backend(backend)
            row[key] = round(median_ms(step, steps), 1)
        row["speedup"] = round(row["reference_ms"] / row["fast_ms"], 2)
        rows.append(row)
        print(f"train step {name:12s} reference {row['reference_ms']:9.1f} ms   "
              f"fast {row['fast_ms']:9.1f} ms   x{row['speedup']}")
    return rows


def malloc_probe(workload, repeats):
    """Time `workload` in this process: the median ms, and per step the minor page faults and
    system (kernel) CPU seconds, which load from other processes blurs far less than wall time."""
    step = grouping_step() if workload == "grouping" else train_step(workload)
    before = resource.getrusage(resource.RUSAGE_SELF)
    ms = median_ms(step, repeats)
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = repeats + 1  # with the warm-up
    return {"ms": round(ms, 1),
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) // steps,
            "sys_s_per_step": round((after.ru_stime - before.ru_stime) / steps, 3),
            "peak_gib": round(peak_memory_gib(torch.device("cpu")), 3)}


def bench_malloc(rounds, tunables, steps):
    """Each workload in fresh processes per GLIBC_TUNABLES variant, the variants taken in turn
    each round so that load from other processes hits them alike: none, the mmap/trim
    thresholds, the given value (run/setup_env.sh's adds transparent huge pages for malloc's
    chunks), and that with mmap_max=0 (no mmap at all: tensors above glibc's 32 MiB cap on
    mmap_threshold are otherwise mapped and unmapped on every step; see the peak memory)."""
    variants = {"none": None, "thresholds": THRESHOLDS, "setup_env": tunables,
                "setup_env+no_mmap": f"{tunables}:glibc.malloc.mmap_max=0"}
    workloads = {"grouping": 7, "pt_seg": steps} if import_build_model() else {"grouping": 7}
    result = {"variants": variants}
    for workload, repeats in workloads.items():
        runs = {name: [] for name in variants}
        for _ in range(rounds):
            for name, value in variants.items():
                env = {key: val for key, val in os.environ.items() if key != "GLIBC_TUNABLES"}
                if value:
                    env["GLIBC_TUNABLES"] = value
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--malloc-probe",
                                      workload, "--steps", str(repeats)],
                                     env=env, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(out.stdout))
        result[workload] = {}
        for name, measured in runs.items():
            result[workload][name] = {"median_ms": statistics.median(run["ms"] for run in measured),
                                      "runs": measured}
            print(f"{workload:8s} GLIBC_TUNABLES {name:17s} "
                  f"median {result[workload][name]['median_ms']:8.1f} ms"
                  f"   rounds {[run['ms'] for run in measured]}"
                  f"   page faults/step {[run['page_faults_per_step'] for run in measured]}"
                  f"   sys s/step {[run['sys_s_per_step'] for run in measured]}"
                  f"   peak GiB {[run['peak_gib'] for run in measured]}")
    return result


def print_op_row(row):
    target = f"{row['target_ms']:>6}" if row["target_ms"] else f"{'-':>6}"
    print(f"{row['what']:34s} {row['reference_ms']:10.1f} {row['fast_ms']:8.1f} "
          f"{row['speedup']:8.1f} {target}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", help="where to write the results (required)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to run (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the ops section runs (the other sections are CPU-only)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed training steps per model, backend and malloc variant")
    parser.add_argument("--malloc-rounds", type=int, default=3,
                        help="rounds of the GLIBC_TUNABLES comparison")
    parser.add_argument("--tunables", default=os.environ.get("GLIBC_TUNABLES", SETUP_ENV_TUNABLES),
                        help="the GLIBC_TUNABLES value compared with none")
    parser.add_argument("--malloc-probe", choices=("grouping", "pt_seg"),
                        help="only time this workload in this process, print JSON (used by the "
                             "malloc section)")
    return parser


def main(args):
    if args.malloc_probe:
        print(json.dumps(malloc_probe(args.malloc_probe, args.steps)))
        return
    if args.json is None:
        raise SystemExit("bench/pointops.py: --json OUT is required")
    device = resolve_device(args.device)
    if device.type == "cuda" and set(args.sections) != {"ops"}:
        raise SystemExit("bench/pointops.py: --device cuda runs the ops section only "
                         "(--sections ops)")
    results = {"machine": machine_info(device)}
    if "ops" in args.sections:
        print(f"{'operation':34s} {'ref ms':>10s} {'fast ms':>8s} {'speedup':>8s} {'target':>6s}")
        results["ops"] = bench_ops(device)
    if "train" in args.sections:
        results["train_step"] = bench_train_step(args.steps)
    if "malloc" in args.sections:
        results["malloc"] = bench_malloc(args.malloc_rounds, args.tunables, args.steps)
    if "fps_sizes" in args.sections:
        results["fps_sizes"] = bench_fps_sizes()
    results["machine"]["loadavg_end"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
