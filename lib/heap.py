"""Keeping freed host memory for the next training step, as torch's CUDA caching allocator keeps
device memory.

torch allocates CPU tensors with malloc. glibc serves any block of 32 MiB or more (its largest
mmap threshold) with a fresh mmap and unmaps it on free, so every step of a CPU training run
asks the kernel again for the same few GiB of large temporaries (the Point Transformer's
(B, N, k, C) neighbour tensors, PCT's (B, M, k, C) groups), and the kernel zeroes every page on
its first touch. Measured on the 2-core development VM (lib/DESIGN.md, "Host memory"): a PCT
training step (B=32 x 1024) faulted in 4.4 GB a step and took 7.1-8.5 s, 3.0-3.5 s with the
memory kept; the default PT (B=16 x 2048) 1.75 s against 1.1-1.2 s.

A training step allocates the same sizes each time, so the heap's free blocks fit the next
step's: with mmap off and trimming off, glibc reuses them and no page is faulted again. The
cost is the heap's fragmentation: the process keeps its peak, plus holes (PCT's peak RSS 2.8 ->
about 4 GiB; the default PT's unchanged). Hence only the repeated-step scripts (pretrain,
finetune, search) ask for it, not a one-pass eval.py, whose room-sized inputs vary in size.
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
