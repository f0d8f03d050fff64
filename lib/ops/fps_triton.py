"""Farthest point sampling on the GPU in one Triton kernel launch.

The pure-torch FPS (lib.ops.geometry.farthest_point_sample_reference) queues six small kernels per
sampled point from a Python loop: about 3,000 launches for 2048 -> 512, 120,000 for a room's
80k -> 20k, and the GPU waits on Python between them. Here one launch runs the whole m-step
loop. Clouds of up to RESIDENT_MAX points get one program each (the layout of the original Point
Transformer's CUDA `furthestsampling`, one thread block per cloud), which keeps the coordinates
and running distances in registers for all m steps. A larger cloud is split over several
programs, each holding a span of about SPLIT_SPAN points (distances in a scratch buffer that
stays in its multiprocessor's L1), which agree on every step's farthest point through global
atomics; one program per cloud streaming all of its points was 19x slower at 80k points.

The answer is the reference's: it starts at geometry.start_index, takes the first index among
equal distances (like argmax), and sums the squared coordinate differences in the same order
without fused multiply-adds (`enable_fp_fusion=False`), so the distances round alike.

Without triton (CPU-only installs) `available` is False and lib.ops keeps the torch loop.
With TRITON_INTERPRET=1 set before import, the kernels run on CPU tensors in Triton's
interpreter: that is how tests check them on a machine without a GPU.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

RESIDENT_MAX = 8192  # points per cloud held in registers (4 values each) for the whole loop
SPLIT_SPAN = 1024  # points per program for larger clouds, whose distances live in a buffer
STREAM_BLOCK = 4096  # points per chunk of such a program's span
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def available(xyz):
    """Whether farthest_point_sample can run on this tensor here."""
    if triton is None or xyz.dtype not in (torch.float32, torch.float64):
        return False
    return xyz.is_cuda or (INTERPRETING and xyz.device.type == "cpu")


# Warps per program, the fastest of 4, 8 and 16 on an H100 in every run of bench/fps_gpu.py:
# a resident cloud of 2,048 points 4 and of 8,192 points 8; a split program's chunk of 1,024
# points 4 and of 2,048 points 8 (the B=8 x 24,000 case).
def _resident_warps(block):
    return 4 if block <= 2048 else 8


def _split_warps(block):
    return 4 if block <= 1024 else 8


def farthest_point_sample(xyz, m, start):
    """Exact FPS. xyz: (B, N, 3) float32/float64 on the GPU, start: (B,) int64 first picks
    -> (B, m) int64."""
    b, n, _ = xyz.shape
    xyz = xyz.detach().contiguous()
    start = start.to(device=xyz.device, dtype=torch.int64).contiguous()
    picks = torch.empty(b, m, dtype=torch.int64, device=xyz.device)
    if n <= RESIDENT_MAX:
        block = max(16, triton.next_power_of_2(n))
        _fps_resident[(b,)](xyz, start, picks, n, m, BLOCK=block,
                            num_warps=_resident_warps(block), enable_fp_fusion=False)
    else:
        parts = _parts(xyz)
        span = -(-n // parts)
        block = min(STREAM_BLOCK, triton.next_power_of_2(span))
        dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
        keys = torch.zeros(b, m if parts > 1 else 1, dtype=torch.int64, device=xyz.device)
        arrivals = torch.zeros(b, m if parts > 1 else 1, dtype=torch.int32, device=xyz.device)
        # parts is not a compile-time constant: it follows N, and a room-by-room evaluation
        # would otherwise compile a kernel per room size
        _fps_split[(b, parts)](xyz, dist, start, picks, keys, arrivals, n, m, span, parts,
                               SPLIT=parts > 1, BLOCK=block, num_warps=_split_warps(block),
                               enable_fp_fusion=False)
    return picks


def _parts(xyz):
    """Programs per cloud for a large cloud: about SPLIT_SPAN points each, all B x parts of
    them resident at once (at most one per multiprocessor), one where the parts cannot agree
    through a packed int64 (float64 distances) or in the interpreter (programs run in turn)."""
    if xyz.dtype != torch.float32 or not xyz.is_cuda:
        return 1
    processors = torch.cuda.get_device_properties(xyz.device).multi_processor_count
    return parts_for(*xyz.shape[:2], processors)


def parts_for(b, n, processors):
    """Split programs per cloud for B clouds of N points on a GPU with `processors` SMs. Under
    MPS with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE a process gets only that share of the SMs, which
    the device properties do not say; waiting programs that cannot all be resident would hang."""
    share = float(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", 100)) / 100
    return max(1, min(int(processors * share) // b, -(-n // SPLIT_SPAN)))


if triton is not None:
    @triton.jit
    def _squared_distance(points, offsets, inside, centre):
        """Squared distances from the points at `offsets` to point `centre`, summed in the
        reference's order ((dx^2 + dy^2) + dz^2)."""
        cx = tl.load(points + centre * 3)
        cy = tl.load(points + centre * 3 + 1)
        cz = tl.load(points + centre * 3 + 2)
        dx = tl.load(points + offsets * 3, mask=inside, other=0.0) - cx
        dy = tl.load(points + offsets * 3 + 1, mask=inside, other=0.0) - cy
        dz = tl.load(points + offsets * 3 + 2, mask=inside, other=0.0) - cz
        return dx * dx + dy * dy + dz * dz

    @triton.jit
    def _fps_resident(xyz_ptr, start_ptr, picks_ptr, n, m, BLOCK: tl.constexpr):
        cloud = tl.program_id(0).to(tl.int64)
        points = xyz_ptr + cloud * n * 3
        offsets = tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(points + offsets * 3, mask=inside, other=0.0)
        y = tl.load(points + offsets * 3 + 1, mask=inside, other=0.0)
        z = tl.load(points + offsets * 3 + 2, mask=inside, other=0.0)
        # -1 lies below every distance, so a padding lane is never the farthest
        dist = tl.where(inside, float("inf"), -1.0).to(x.dtype)
        farthest = tl.load(start_ptr + cloud)
        for i in range(m):
            tl.store(picks_ptr + cloud * m + i, farthest)
            dx = x - tl.load(points + farthest * 3)
            dy = y - tl.load(points + farthest * 3 + 1)
            dz = z - tl.load(points + farthest * 3 + 2)
            dist = tl.minimum(dist, dx * dx + dy * dy + dz * dz)
            farthest = tl.argmax(dist, axis=0, tie_break_left=True).to(tl.int64)

    @triton.jit
    def _fps_split(xyz_ptr, dist_ptr, start_ptr, picks_ptr, keys_ptr, arrivals_ptr, n, m, span,
                   parts, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """Program (cloud, part) keeps the running distances of points [part * span, + span)
        of its cloud. Each step it finds its own farthest point; when SPLIT (parts > 1) the
        parts then agree on the cloud's farthest through one atomic max and wait for each
        other, so all B x parts programs must be resident at once (the caller keeps them
        within the multiprocessors)."""
        cloud = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        points = xyz_ptr + cloud * n * 3
        dists = dist_ptr + cloud * n  # filled with +inf by the caller
        lo = part * span
        hi = tl.minimum(lo + span, n)
        farthest = tl.load(start_ptr + cloud)
        for i in range(m):
            if part == 0:
                tl.store(picks_ptr + cloud * m + i, farthest)
            best = tl.full((), -1.0, dtype=dist_ptr.dtype.element_ty)
            best_at = farthest
            for first in range(lo, hi, BLOCK):
                offsets = first + tl.arange(0, BLOCK)
                inside = offsets < hi
                # Each lane reads back only the distances it wrote itself: no barrier needed.
                dist = tl.minimum(tl.load(dists + offsets, mask=inside, other=-1.0),
                                  _squared_distance(points, offsets, inside, farthest))
                tl.store(dists + offsets, dist, mask=inside)
                chunk_best = tl.max(dist, axis=0)
                chunk_at = tl.argmax(dist, axis=0, tie_break_left=True)
                further = chunk_best > best  # strictly: an earlier chunk keeps a tie
                best_at = tl.where(further, first + chunk_at.to(tl.int64), best_at)
                best = tl.where(further, chunk_best, best)
            if not SPLIT:
                farthest = best_at
            else:
                # One int64 per candidate, largest for the largest distance and then the
                # smallest index: the bits of a non-negative float32 order like the integers.
                key = (best.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0xFFFFFFFF - best_at)
                step = cloud * m + i
                tl.atomic_max(keys_ptr + step, key, sem="relaxed")
                # acq_rel: releases the max above to the parts that see this arrival
                arrived = tl.atomic_add(arrivals_ptr + step, 1, sem="acq_rel") + 1
                while arrived < parts:
                    arrived = tl.atomic_add(arrivals_ptr + step, 0, sem="acquire")
                key = tl.atomic_max(keys_ptr + step, 0, sem="acquire")  # an atomic read
                farthest = 0xFFFFFFFF - (key & 0xFFFFFFFF)
