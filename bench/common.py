"""Timing, memory and machine facts shared by bench/run.py's sections.

The paths of a comparison are timed in turn, call after call, so that load from other
processes on a shared machine hits them alike; each figure is the median of its calls. A
speedup always compares like with like: the fast path against the plain-PyTorch reference in
the same dtype (fp32 with fp32, bf16 autocast with bf16 autocast).
"""
import datetime
import os
import platform
import resource
import statistics
import time

import torch

from lib import ops

# path -> (lib.ops backend, bf16 autocast): the fp32 pair, and the bf16 pair beside it
PATHS = {"fast": ("auto", False), "reference": ("reference", False)}
BF16_PATHS = {"fast_bf16": ("auto", True), "reference_bf16": ("reference", True)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(wall seconds of fn(), its result), device work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def on_path(path, fn):
    """fn(amp) under the path's lib.ops backend; the backend is "auto" again afterwards."""
    backend, amp = {**PATHS, **BF16_PATHS}[path]
    ops.set_backend(backend)
    try:
        return fn(amp)
    finally:
        ops.set_backend("auto")


def compare(runs, repeats, device, warmup=1):
    """runs: {name: fn()}, e.g. one per path. `warmup` untimed calls of each, then the timed
    calls of all of them interleaved. repeats: {name: number of timed calls}.
    Returns {name: [seconds]}."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in runs}
    for i in range(max(repeats.values())):
        for name, fn in runs.items():
            if i < repeats[name]:
                samples[name].append(timed(fn, device)[0])
    return samples


def speed_figures(prefix, items, samples, suffix=""):
    """Throughput of a fast / reference pair (items per second, from the median call) and
    their ratio; suffix "_bf16" for the bf16 pair."""
    fast, reference = (statistics.median(samples[path + suffix]) for path in PATHS)
    return {f"{prefix}{suffix}_shapes_per_s": items / fast,
            f"{prefix}{suffix}_reference_shapes_per_s": items / reference,
            f"{prefix}{suffix}_speedup": reference / fast}


def settings(batch, points, threads, dtypes, **extra):
    """What a figure was measured at, so that other implementations can be timed alike."""
    return {"batch": batch, "points": points, "threads": threads, "dtypes": dtypes, **extra}


def peak_memory_gib(device):
    """Peak memory of this process so far: allocated tensor memory on CUDA; on the CPU the peak
    resident set of this program (VmHWM). Not ru_maxrss: Linux carries the parent's peak into
    a child across fork/vfork + exec, so a child of a 5 GiB process reports 5 GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2 ** 20  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def machine_info(device):
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": str(device), "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            "env": {key: os.environ.get(key) for key in
                    ("GLIBC_TUNABLES", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()
