"""CPU training steps with and without lib/heap.keep_freed_memory, each in a fresh process.

    . run/setup_env.sh && python bench/heap.py --json OUT    # about 8 minutes on 2 cores

For each configuration (the default PT part segmentation at B=16 and B=8 x 2048 points, the
tiny one at B=16, PCT classification at B=32 x 1024; fp32, the fast path, the caller's threads
and GLIBC_TUNABLES) a worker process builds the model and its SGD step, runs `--warmup`
untimed steps, then `--steps` timed ones, with POINT_HAQ_KEEP_FREED=0 ("plain": glibc maps and
unmaps every block of 32 MiB or more) or 1 ("kept", as the scripts run, lib/heap.py). Reports
per mode the median step, the kernel (system) CPU time and the minor page faults per timed
step, and the process's peak RSS; the two modes alternate, `--rounds` times.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (model, batch, points)
CONFIGS = {"pt_seg_b16": ("pt_seg", 16, 2048), "pt_seg_b8": ("pt_seg", 8, 2048),
           "pt_seg_tiny_b16": ("pt_seg_tiny", 16, 2048), "pct_cls_b32": ("pct_cls", 32, 1024)}
MODES = {"plain": "0", "kept": "1"}


def worker(config, warmup, steps, data_root):
    """Runs in the child: the timed steps of one configuration, as one JSON line."""
    import torch
    from bench.run import build_pct, build_pt, part_shapes, train_step
    from lib import heap
    from lib.haq.policy_eval import cached_batches

    kept = heap.keep_freed_memory(torch.device("cpu"))
    model_name, batch_size, points = CONFIGS[config]
    dataset = part_shapes(argparse.Namespace(data_root=data_root), points)
    batch = cached_batches(dataset, list(range(batch_size)), batch_size, torch.device("cpu"))[0]
    if model_name == "pct_cls":
        batch, task = dict(batch, label=batch["category"]), "cls"
        model = build_pct(dataset, torch.device("cpu"))
    else:
        task = "partseg"
        model = build_pt(model_name, dataset, torch.device("cpu"))
    step = train_step(model, batch, task)
    for _ in range(warmup):
        step(None)
    seconds = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        step(None)
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"kept": kept, "seconds": seconds, "median_s": statistics.median(seconds),
                      "sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
                      "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                      "peak_rss_gib": after.ru_maxrss / 2 ** 20}))


def main(args):
    results = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
               "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "warmup": args.warmup, "steps": args.steps, "configs": {}}
    for config in args.configs:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode, flag in MODES.items():
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--worker", config,
                     "--warmup", str(args.warmup), "--steps", str(args.steps)]
                    + (["--data-root", args.data_root] if args.data_root else []),
                    capture_output=True, text=True, env=dict(os.environ, POINT_HAQ_KEEP_FREED=flag))
                if out.returncode:
                    raise RuntimeError(f"bench/heap.py: {config} {mode} failed:\n{out.stderr}")
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs[mode].append(run)
                print(f"{config:16s} {mode:5s} median {run['median_s']:.3f} s  sys "
                      f"{run['sys_s_per_step']:.3f} s/step  faults {run['faults_per_step']:.0f}"
                      f"/step  peak RSS {run['peak_rss_gib']:.2f} GiB", flush=True)
        results["configs"][config] = runs
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", help="where to write the results (required)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed steps first (the heap settles in a few)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-root", default=None,
                        help="synthetic_parts folder (default: data/synthetic/parts)")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.worker:
        worker(parsed.worker, parsed.warmup, parsed.steps, parsed.data_root)
    elif parsed.json is None:
        raise SystemExit("bench/heap.py: --json OUT is required")
    else:
        main(parsed)
