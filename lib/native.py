"""Builds and loads the C kernels in lib/csrc/: the Point Transformer layer's fused per-neighbour
operations (pt_layer.c), the BatchNorm-ReLU-Linear at the start of its gamma
(norm_relu_linear.c), TransitionDown's max-pooling (neighbour_max.c), and FPS and kNN for
object clouds (geometry.c).

Plain C called through ctypes rather than a torch C++ extension: it compiles in about a second
with the system's C compiler (a torch extension takes a minute and needs the torch headers), and
ctypes releases the GIL during the call. The library is built once per source, compiler and CPU
(it is compiled for the host CPU's instruction set) into a cache folder, atomically, so
concurrent processes (DDP ranks) can race to build it. Without a C compiler, or with
POINT_HAQ_NATIVE=0, `library()` is None and lib/fast_layers.py uses the PyTorch forms.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(SOURCE_DIR, name)
           for name in ("pt_layer.c", "norm_relu_linear.c", "neighbour_max.c", "geometry.c")]
HEADERS = [os.path.join(SOURCE_DIR, "parallel.h")]
# -ffp-contract=off: no fused multiply-adds, so FPS rounds its distances as the torch
# reference does and picks the same points. -fopenmp: see parallel.h; the library's libgomp.so.1
# resolves to the one torch loaded (the same soname), so both share one thread pool.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
OPENMP = ["-fopenmp"]
_UNSET = object()
_library = _UNSET


def cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "point-transformer-haq")


def _cpu_flags():
    """The host CPU's feature list: part of the build key, since -march=native depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler):
    sources = []
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            sources.append(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha1(b"\0".join(sources + [" ".join(FLAGS + OPENMP).encode(),
                                             version.encode(), _cpu_flags().encode()])
                       ).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
        os.close(fd)
        try:
            for openmp in (OPENMP, []):  # a compiler without OpenMP: serial loops
                result = subprocess.run([compiler, *FLAGS, *openmp, *SOURCES, "-o", tmp, "-lm"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            if result.returncode:
                lines = result.stderr.strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"{compiler} exited with "
                                   f"{result.returncode}")
            os.replace(tmp, path)  # atomic: a racing process loads a complete library
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _declare(lib):
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    head = [ctypes.c_int, ctypes.c_int, i64, i64, i64, i64]  # dtype, threads, B, N, K, C
    lib.pt_relation_forward.argtypes = head + [ptr] * 5
    lib.pt_relation_backward.argtypes = head + [ptr] * 4
    lib.pt_aggregate_forward.argtypes = head + [i64] + [ptr] * 5
    lib.pt_aggregate_backward.argtypes = head + [i64] + [ptr] * 8
    for fn in (lib.pt_relation_forward, lib.pt_relation_backward, lib.pt_aggregate_forward,
               lib.pt_aggregate_backward):
        fn.restype = None
    lib.neighbour_max_forward.argtypes = [ctypes.c_int, ctypes.c_int, i64, i64, i64] + [ptr] * 3
    lib.neighbour_max_backward.argtypes = [ctypes.c_int, ctypes.c_int, i64, i64, i64] + [ptr] * 3
    lib.neighbour_max_forward.restype = lib.neighbour_max_backward.restype = None
    head = [ctypes.c_int, ctypes.c_int, i64, i64]  # dtype, threads, M, C
    lib.nrl_stats.argtypes = head + [ptr, ptr]
    lib.nrl_forward.argtypes = head + [i64] + [ptr] * 6
    lib.nrl_backward_sums.argtypes = head + [i64] + [ptr] * 8
    lib.nrl_backward_input.argtypes = head + [i64] + [ptr] * 11
    lib.nrl_stats.restype = lib.nrl_backward_sums.restype = ctypes.c_int
    lib.nrl_forward.restype = lib.nrl_backward_input.restype = None
    lib.fps.argtypes = [ctypes.c_int, i64, i64, i64, ptr, ptr, ptr]  # threads, B, N, m, ...
    lib.knn.argtypes = [ctypes.c_int, i64, i64, i64, i64, ptr, ptr, ptr, ptr]  # threads, B, N,
    lib.fps.restype = lib.knn.restype = ctypes.c_int                           # M, k, ...
    return lib


def library():
    """The loaded kernels (ctypes.CDLL), built on first use; None where they cannot be had."""
    global _library
    if _library is _UNSET:
        _library = None
        compiler = os.environ.get("CC", "cc")
        if os.environ.get("POINT_HAQ_NATIVE", "1") == "0":
            return None
        if platform.system() == "Windows" or shutil.which(compiler) is None:
            warnings.warn(f"lib/native.py: no C compiler ({compiler}) on PATH; the CPU uses "
                          "the slower PyTorch and numpy forms")
            return None
        try:
            _library = _declare(ctypes.CDLL(_build(compiler)))
        except (OSError, RuntimeError) as err:
            warnings.warn(f"lib/native.py: building the C kernels in {SOURCE_DIR} failed "
                          f"({err}); the CPU uses the slower PyTorch and numpy forms")
    return _library
