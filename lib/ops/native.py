"""Builds, verifies and loads the C kernels in lib/ops/csrc/, and calls them by parameter name.

Plain C through ctypes rather than a torch C++ extension: the library compiles in a few seconds
with the system's C compiler, where `torch.utils.cpp_extension` needs a C++ compiler and the
torch headers and took far longer for a one-function probe (README, "Speed on the CPU"), and
ctypes releases the GIL during the call. What an extension would give, checked signatures, is
had here by reading them from the C sources: every exported (non-static) function's prototype
is parsed into its ctypes argument types, and `call()` takes the arguments by their C names, so
a changed, added or reordered C parameter is a one-line error instead of memory corruption.

The build is keyed by the sources, flags, compiler version and host CPU (-march=native), and
is safe under concurrent processes (DDP ranks, parallel tests): one process compiles under a
file lock while the others wait for it, then everyone loads the same file. A cached library is
trusted only when its size and SHA-256 match the record written beside it after a complete
build (a truncated file, from a full disk or a killed copy, used to give `Bus error` on every
run); otherwise it is rebuilt. The cache is `$XDG_CACHE_HOME/point-transformer-haq` (default
~/.cache/...), or a per-user folder in the temporary directory where that is not writable.
Files get the usual permissions (the umask's). Without a C compiler, with POINT_HAQ_NATIVE=0,
or when the build fails or times out, `library()` is None and lib/ops uses the PyTorch forms.
"""
import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import warnings

import torch

from lib.checkpoint import file_sha256

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(SOURCE_DIR, name)
           for name in ("pt_layer.c", "attention_inference.c", "norm_relu_linear.c",
                        "neighbour_max.c", "geometry.c", "position_encoding.c",
                        "attention_softmax.c", "gather_rows.c")]
HEADERS = [os.path.join(SOURCE_DIR, name) for name in ("parallel.h", "bf16.h", "softmax.h")]
# -ffp-contract=off: no fused multiply-adds, so FPS rounds its distances as the torch
# reference does and picks the same points. -fopenmp: see csrc/parallel.h.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
OPENMP = ["-fopenmp"]
COMPILE_TIMEOUT_S = 300  # a wedged compiler must not hang every DDP rank waiting on the lock
_C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "double": ctypes.c_double}
_UNSET = object()
_library = _UNSET


def cache_dirs():
    """Where the library may be cached, in order of preference."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return [os.path.join(root, "point-transformer-haq"),
            os.path.join(tempfile.gettempdir(), f"point-transformer-haq-{user}")]


def _writable_cache():
    for directory in cache_dirs():
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK | os.X_OK) and _private(directory):
            return directory
    raise RuntimeError(f"no writable cache folder of this user's among "
                       f"{', '.join(cache_dirs())}")


def _private(directory):
    """Whether `directory` is this user's and not writable by everyone: the library found there
    is loaded into the process, and the fallback lies in the shared temporary folder, where
    another user could make the folder first and leave a library of their own in it. (A group
    may write: a lab's umask 002 makes the cache folder so.)"""
    if not hasattr(os, "getuid"):
        return True
    info = os.stat(directory)
    return info.st_uid == os.getuid() and not info.st_mode & stat.S_IWOTH


def _cpu_flags():
    """The host CPU's feature list: part of the build key, since -march=native depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _digest(path):
    """'size sha256' of a file."""
    return f"{os.path.getsize(path)} {file_sha256(path)}"


def _verified(path):
    """Whether `path` is a complete build: its size and hash match the record beside it."""
    try:
        with open(path + ".sha256") as f:
            return f.read().strip() == _digest(path)
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock on `path` (created if missing), held inside the block."""
    import fcntl
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(command):
    """(exit status, stderr) of `command`, killed with all its children (a compiler driver's cc1
    and as) after COMPILE_TIMEOUT_S: raises subprocess.TimeoutExpired then."""
    # errors="replace": a compiler's messages in another encoding must not raise here
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace", start_new_session=True) as process:
        try:
            _, stderr = process.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return process.returncode, stderr


def _compile(compiler, sources, path):
    """Compiles `sources` into `path` and records its digest beside it, both atomically."""
    work = tempfile.mkdtemp(dir=os.path.dirname(path))
    try:
        out = os.path.join(work, "kernels.so")  # created by the compiler: the umask's mode
        for openmp in (OPENMP, []):  # a compiler without OpenMP: serial loops
            status, stderr = _run([compiler, *FLAGS, *openmp, *sources, "-o", out, "-lm"])
            if status == 0:
                break
        if status:
            lines = stderr.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"{compiler} exited with {status}")
        record = os.path.join(work, "kernels.sha256")
        with open(record, "w") as f:
            f.write(_digest(out) + "\n")
        os.replace(out, path)  # the library first: a reader checks it against the record
        os.replace(record, path + ".sha256")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(compiler, sources=SOURCES, headers=HEADERS, name="kernels"):
    """Path of a verified library built from `sources`, compiled at most once however many
    processes ask at the same time."""
    parts = []
    for source in sources + headers:
        with open(source, "rb") as f:
            parts.append(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             errors="replace", timeout=COMPILE_TIMEOUT_S).stdout
    key = hashlib.sha1(b"\0".join(parts + [" ".join(FLAGS + OPENMP).encode(), version.encode(),
                                           _cpu_flags().encode()])).hexdigest()[:16]
    path = os.path.join(_writable_cache(), f"{name}-{key}.so")
    if _verified(path):
        return path
    with _locked(path + ".lock"):
        if not _verified(path):  # else another process built it while this one waited
            if os.path.exists(path):
                warnings.warn(f"lib/ops/native.py: cached {path} is incomplete or changed "
                              "(size or hash); rebuilding it")
            _compile(compiler, sources, path)
    return path


def prototypes(sources=SOURCES):
    """{function: (restype, [(parameter name, ctypes type)])} for every exported function of the
    C sources, read from their definitions (`int name(type a, ...) {` at the start of a line)."""
    found = {}
    pattern = re.compile(r"^(int|void)\s+(\w+)\s*\(([^)]*)\)\s*\{", re.M)
    for source in sources:
        with open(source) as f:
            text = f.read()
        for restype, name, params in pattern.findall(text):
            args = []
            for param in params.split(","):
                words = param.replace("*", " * ").split()
                c_type = (ctypes.c_void_p if "*" in words
                          else _C_TYPES.get(" ".join(w for w in words[:-1] if w != "const")))
                if c_type is None:
                    raise RuntimeError(f"{os.path.basename(source)}: {name}: no ctypes type "
                                       f"for parameter '{param.strip()}'")
                args.append((words[-1], c_type))
            found[name] = (ctypes.c_int if restype == "int" else None, args)
    return found


class Kernels:
    """The loaded library; `call(name, **arguments)` runs a kernel with its arguments given by
    their C parameter names (tensors pass their data pointer, None a null pointer; `threads`
    defaults to torch's intra-op thread count)."""

    def __init__(self, path, sources=SOURCES):
        self.cdll = ctypes.CDLL(path)
        self.params = {}
        for name, (restype, args) in prototypes(sources).items():
            fn = getattr(self.cdll, name)
            fn.argtypes, fn.restype = [t for _, t in args], restype
            self.params[name] = [p for p, _ in args]

    def call(self, name, **arguments):
        params = self.params[name]
        if "threads" in params:
            arguments.setdefault("threads", torch.get_num_threads())
        if sorted(arguments) != sorted(params):
            raise TypeError(f"lib/ops/csrc: {name}({', '.join(params)}) called with "
                            f"({', '.join(arguments)})")
        values = [arguments[p] for p in params]
        values = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values]
        return getattr(self.cdll, name)(*values)


def compiler():
    """The C compiler the kernels are built with: $CC, else `cc`."""
    return os.environ.get("CC", "cc")


def library():
    """The loaded kernels (a Kernels), built on first use; None where they cannot be had."""
    global _library
    if _library is _UNSET:
        _library = None
        if os.environ.get("POINT_HAQ_NATIVE", "1") == "0":
            return None
        cc = compiler()
        if platform.system() == "Windows" or shutil.which(cc) is None:
            warnings.warn(f"lib/ops/native.py: no C compiler ({cc}) on PATH; the CPU uses "
                          "the slower PyTorch and numpy forms")
            return None
        try:
            _library = Kernels(build(cc))
        # AttributeError: a library that lacks a kernel's symbol (ctypes' lookup)
        except (OSError, RuntimeError, AttributeError, subprocess.TimeoutExpired) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            warnings.warn(f"lib/ops/native.py: building the C kernels in {SOURCE_DIR} failed "
                          f"({message}); the CPU uses the slower PyTorch and numpy forms")
    return _library
