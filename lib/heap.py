"""Keeping freed host memory for the next training step, as torch's CUDA caching allocator keeps
device memory.

torch allocates CPU tensors with malloc. glibc serves any block of 32 MiB or more (its largest
mmap threshold) with a fresh mmap and unmaps it on free, so every step of a CPU training run
asks the kernel again for the same large temporaries (the Point Transformer's (B, N, k, C)
neighbour tensors, PCT's (B, M, k, C) groups), and the kernel zeroes each page on its first
touch: on the development VM a PCT step (B=32 x 1024) spent 4.5-5.7 s of system CPU on it and
took 6.2-7.0 s, 2.9-3.2 s with the memory kept (bench/heap.py, bench/RESULTS.md).

A training step allocates the same sizes each time, so freed blocks fit the next step's: with
mmap and trimming off, glibc keeps them in its heap and no page is faulted again. The cost is
the heap's peak plus its holes (PCT's peak RSS 2.8 -> 4.2 GiB; the Point Transformer's about
unchanged). Every script that runs a model over batches asks for it (lib/DESIGN.md).
"""
import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory(device):
    """On a CPU run under glibc: serve every allocation from the heap (no mmap) and never give
    the heap's top back (no trim), for the rest of the process. Returns whether it did; other
    devices and C libraries, and POINT_HAQ_KEEP_FREED=0, leave malloc as it is."""
    if (device.type != "cpu" or platform.libc_ver()[0] != "glibc"
            or os.environ.get("POINT_HAQ_KEEP_FREED", "1") == "0"):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold disables trimming (mallopt(3))
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
