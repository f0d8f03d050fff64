"""Geometry operations on batched point clouds: FPS, kNN, gathering, grouping, interpolation.

Convention used everywhere in this repository: a batch of clouds is dense, `xyz` is (B, N, 3)
and features are (B, N, C), channels last. A single large cloud (an S3DIS room) is B = 1.
Index tensors are int64 and index the N axis of their own batch element.

Every operation has a pure-torch reference (any device); lib/ops/dispatch.py chooses the form
that runs. The fast forms return the reference's indices up to ties and float32 rounding: a near
tie may be broken the other way (bench/RESULTS.md). bench/pointops.py and bench/fps_gpu.py
compare them.
"""
import warnings

import fpsample
import numpy as np
import torch
from pykdtree.kdtree import KDTree
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from lib.ops import dispatch, fps_triton, native
from lib.ops.tape import taped


def start_index(xyz):
    """FPS start: the point farthest from the centroid, so the sample does not depend on
    point order (permuting the input permutes, but does not change, the sampled set).
    xyz: (B, N, 3) -> (B,) int64."""
    centroid = xyz.mean(dim=1, keepdim=True)  # (B, 1, 3)
    return ((xyz - centroid) ** 2).sum(-1).argmax(dim=1)


# Pure-torch reference: any device, also the CUDA path.

def farthest_point_sample_reference(xyz, m):
    """Exact farthest point sampling. xyz: (B, N, 3) -> (B, m) int64, first = start_index.
    Each step is six small kernels and no host synchronisation (the picks are stacked once at
    the end), so on a GPU the loop only queues launches."""
    b, n, _ = xyz.shape
    xyz = xyz.detach()
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = start_index(xyz)  # (B,)
    picks = []
    for _ in range(m):
        picks.append(farthest)
        centre = xyz.gather(1, farthest.view(b, 1, 1).expand(b, 1, 3))  # (B, 1, 3)
        torch.minimum(dist, (xyz - centre).square_().sum(-1), out=dist)
        farthest = dist.argmax(dim=1)
    return torch.stack(picks, dim=1)


def knn_query_reference(k, support, query, chunk=4096):
    """k nearest support points of each query point (the point itself included when it is in
    the support set). support: (B, N, 3), query: (B, M, 3) -> (idx (B, M, k) int64,
    squared distances (B, M, k)), nearest first. Chunked over M to bound memory on rooms."""
    support = support.detach()
    query = query.detach()
    idx_chunks, dist_chunks = [], []
    for start in range(0, query.shape[1], chunk):
        q = query[:, start:start + chunk]
        # The matrix-product form of cdist leaves ~1e-6 on zero distances, enough to make
        # `interpolate` miss the value at a source point by a few percent.
        d = torch.cdist(q, support, compute_mode="donot_use_mm_for_euclid_dist")
        d = d ** 2  # (B, m, N)
        dist, idx = d.topk(k, dim=-1, largest=False, sorted=True)
        idx_chunks.append(idx)
        dist_chunks.append(dist)
    return torch.cat(idx_chunks, 1), torch.cat(dist_chunks, 1)


def fps_shortfall(xyz, idx):
    """How far a sample falls short of farthest point sampling, for checking a fast path where
    near ties make index equality too strict: the largest relative gap, over the steps, between
    the farthest remaining point's distance to the points already picked and the pick's own,
    in float64 (0 for an exact FPS; float32 rounding leaves about 1e-7). xyz: (B, N, 3),
    idx: (B, m) -> float."""
    xyz = xyz.detach().double()
    b = xyz.shape[0]
    dist = torch.full(xyz.shape[:2], float("inf"), dtype=torch.float64, device=xyz.device)
    worst = torch.zeros(b, dtype=torch.float64, device=xyz.device)
    for step in range(1, idx.shape[1]):
        picked = xyz.gather(1, idx[:, step - 1].view(b, 1, 1).expand(b, 1, 3))
        torch.minimum(dist, (xyz - picked).square().sum(-1), out=dist)
        farthest = dist.max(dim=1).values
        gap = (farthest - dist.gather(1, idx[:, step:step + 1]).squeeze(1)) / farthest
        worst = torch.maximum(worst, gap)
    return float(worst.max())


def knn_query_matmul(k, support, query, chunk=4096, margin=8):
    """knn_query_reference's answer through a matrix product, the fast path for CUDA tensors.
    There cdist's exact mode ("donot_use_mm") reduces each distance in its own thread block:
    8 s for the kNN of an 80k-point room on an H100 (bench/RESULTS.md). Here |s|^2 - 2 q.s
    (one batched GEMM, the cloud centred first so that float32 keeps the small differences)
    ranks k + margin candidates per query; their exact squared distances, computed as the
    reference computes them, then choose and order the k. Only a neighbour whose GEMM distance
    is off by more than the gap from the k-th to the (k + margin)-th could be missed."""
    support, query = support.detach(), query.detach()
    wide = min(support.shape[1], k + margin)
    centre = support.mean(dim=1, keepdim=True)
    centred = support - centre
    norms = centred.square().sum(-1).unsqueeze(1)  # (B, 1, N)
    idx_chunks, dist_chunks = [], []
    for start in range(0, query.shape[1], chunk):
        q = query[:, start:start + chunk]
        # never in bf16, which training's autocast would pick for a GEMM: 3 significant digits
        # of |s|^2 cannot rank neighbours
        with torch.autocast(support.device.type, enabled=False):
            ranking = torch.baddbmm(norms, q - centre, centred.transpose(1, 2), alpha=-2)
        candidates = ranking.topk(wide, dim=-1, largest=False, sorted=False).indices
        exact = (gather(support, candidates) - q.unsqueeze(2)).square().sum(-1)  # (B, m, wide)
        dist, order = exact.topk(k, dim=-1, largest=False, sorted=True)
        idx_chunks.append(candidates.gather(-1, order))
        dist_chunks.append(dist)
    return torch.cat(idx_chunks, 1), torch.cat(dist_chunks, 1)


# Fast CPU path: one cloud at a time in numpy (B is small), no gradients through indices.

def _to_numpy(xyz, dtype):
    """(B, N, 3) CPU tensor -> C-contiguous numpy array of torch `dtype` (no copy if it is)."""
    return np.ascontiguousarray(xyz.detach().to(dtype).numpy())


def _check_status(status, where):
    """Raises for a C kernel's failure status (lib/ops/csrc/parallel.h); True when it ran, False
    when the clouds hold NaN or infinite coordinates, which the kNN grid cannot bucket."""
    if status == -1:
        raise MemoryError(f"lib/ops/csrc/{where}: out of memory")
    if status == -3:
        raise ValueError(f"lib/ops/csrc/{where}: shape outside what the kernel takes")
    return status == 0


def farthest_point_sample_cpu(xyz, m):
    """Exact FPS from start_index in float32, one call for all clouds: lib/ops/csrc/geometry.c's
    (the reference's steps, pruned on a kd-split for large clouds, so the reference's picks when
    xyz is float32, ties included), or without the C library fpsample's plain FPS, one cloud at
    a time. xyz: (B, N, 3) CPU tensor -> (B, m) int64. The C lanes carry int32 indices: a cloud
    of 2^31 points or more takes the torch loop."""
    b, n, _ = xyz.shape
    if n >= 2 ** 31:
        return farthest_point_sample_reference(xyz, m)
    lib = native.library()
    points = xyz.detach().to(torch.float32).contiguous()
    starts = start_index(points).contiguous()
    if lib is not None:
        out = torch.empty(b, m, dtype=torch.int64)
        _check_status(lib.call("fps", B=b, N=n, m=m, xyz=points, start=starts, out=out),
                      "geometry.c")
        return out
    return torch.from_numpy(np.stack([
        fpsample.fps_sampling(cloud, m, start_idx=start).astype(np.int64)
        for cloud, start in zip(points.numpy(), starts.tolist())]))


def knn_query_cpu(k, support, query):
    """knn_query_reference on the CPU: float32 clouds on lib/ops/csrc/geometry.c's grid search
    (all clouds in one call, over torch's threads), float64 ones (or all, without the C
    library) on a pykdtree kd-tree, one cloud at a time.
    support: (B, N, 3), query: (B, M, 3) CPU tensors -> (idx (B, M, k) int64, dist2 (B, M, k))."""
    dtype = torch.promote_types(support.dtype, query.dtype)
    lib = native.library()
    if lib is not None and dtype == torch.float32:
        support, query = support.detach().contiguous(), query.detach().contiguous()
        (b, n, _), m = support.shape, query.shape[1]
        idx = torch.empty(b, m, k, dtype=torch.int64)
        dist2 = torch.empty(b, m, k, dtype=torch.float32)
        if _check_status(lib.call("knn", B=b, N=n, M=m, k=k, support=support, query=query,
                                  idx=idx, dist2=dist2), "geometry.c"):
            return idx, dist2
    # pykdtree takes float32 or float64 (the same for both arrays)
    np_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    support_np, query_np = _to_numpy(support, np_dtype), _to_numpy(query, np_dtype)
    b, m = query.shape[:2]
    idx = np.empty((b, m, k), dtype=np.int64)
    dist2 = np.empty((b, m, k), dtype=support_np.dtype)
    for i in range(b):
        # 1-D results when k == 1, hence the reshape
        d, j = KDTree(support_np[i]).query(query_np[i], k=k, sqr_dists=True)
        dist2[i] = d.reshape(m, k)
        idx[i] = j.reshape(m, k)
    return torch.from_numpy(idx), torch.from_numpy(dist2).to(dtype)


# Dispatch (lib/ops/dispatch.py decides the form).

def check_clouds(where, *clouds):
    """Raises a one-line ValueError unless each of `clouds` is (B, N_i, 3) with one B and, on
    the CPU, every coordinate finite: the C kernels read three floats a point from B clouds, and
    a NaN has no nearest or farthest point (the forms would each answer differently). CUDA
    clouds are not scanned for NaN, which would cost a host synchronisation per call."""
    for xyz in clouds:
        if xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[0] != clouds[0].shape[0]:
            raise ValueError(f"lib/ops: {where} takes (B, N, 3) clouds of one batch, got "
                             f"{' and '.join(str(tuple(c.shape)) for c in clouds)}")
    for xyz in clouds:
        if xyz.device.type == "cpu" and xyz.is_floating_point() and \
                not bool(torch.isfinite(xyz).all()):
            raise ValueError(f"lib/ops: {where}: coordinates hold NaN or infinite values")


def farthest_point_sample(xyz, m):
    """(B, N, 3) -> (B, m) int64 indices of an exact FPS starting at start_index."""
    check_clouds("farthest_point_sample", xyz)
    n = xyz.shape[1]
    if not 1 <= m <= n:
        raise ValueError(f"farthest_point_sample: cannot sample {m} of {n} points")
    fps = globals()[_FPS[dispatch.fps_form(xyz)]]
    return taped("farthest_point_sample", m, (xyz,), lambda: fps(xyz, m))


def knn_query(k, support, query):
    """See knn_query_reference (the same answer, up to ties, from the form dispatch picks)."""
    check_clouds("knn_query", support, query)
    n = support.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"knn_query: cannot find {k} neighbours among {n} points")
    knn = globals()[_KNN[dispatch.knn_form(support, query)]]
    return taped("knn_query", k, (support, query), lambda: knn(k, support, query))


def _fps_triton(xyz, m):
    return fps_triton.farthest_point_sample(xyz, m, start_index(xyz.detach()))


# form -> the function's name here (looked up at call time, so tests can replace a form)
_FPS = {"native": "farthest_point_sample_cpu", "fpsample": "farthest_point_sample_cpu",
        "triton": "_fps_triton", "reference": "farthest_point_sample_reference"}
_KNN = {"native": "knn_query_cpu", "kdtree": "knn_query_cpu", "matmul": "knn_query_matmul"}


_checked_indices = WeakIdKeyDictionary()  # idx tensor -> (its version, N) when last checked


def check_index(idx, n):
    """Raises a one-line ValueError unless every entry of the CPU index tensor `idx` lies in
    [0, n): gather below flattens the batch, so an index past its cloud would read another
    cloud's row (index_select itself refuses rows outside the batch). One min/max pass, done
    once per index tensor and n (a stage's kNN serves all its blocks) until torch records a
    change to the tensor (its version counter): a write that torch does not see, through
    `.numpy()` or `.data`, is not checked again, and such a gather can then return another
    cloud's row (never memory outside the tensor). Inference tensors have no version counter
    and are checked at every call. The C kernels check each index they read themselves
    (csrc/parallel.h's checked_index), whatever torch saw. CUDA tensors are left to the
    device's own bounds checks (a host synchronisation per call would stall the GPU), and so
    are graphs under torch.compile (a data-dependent branch would split them)."""
    if idx.device.type != "cpu" or idx.numel() == 0 or torch.compiler.is_compiling():
        return
    cached = not idx.is_inference()
    if cached and _checked_indices.get(idx) == (idx._version, n):
        return
    if idx.dtype != torch.int64:
        raise ValueError(f"lib/ops: neighbour indices must be int64, not {idx.dtype}")
    low, high = idx.aminmax()
    if low < 0 or high >= n:
        raise ValueError(f"lib/ops: neighbour index out of range: [{int(low)}, {int(high)}] "
                         f"for clouds of {n} points")
    if cached:
        _checked_indices[idx] = (idx._version, n)


def gather(features, idx):
    """Rows of `features` at `idx`, per batch element.
    features: (B, N, C), idx: (B, *S) int64 -> (B, *S, C).
    A flattened index_select: its backward (index_add) is faster than advanced indexing's. On
    the fast path a gather that needs a gradient sums it with a sparse matrix instead
    (_GatherRows)."""
    b, n, c = features.shape
    if idx.dim() < 1 or idx.shape[0] != b:  # another batch would broadcast, or read past it
        raise ValueError(f"lib/ops: gather from {b} clouds with indices of shape "
                         f"{tuple(idx.shape)}")
    check_index(idx, n)
    offset = (torch.arange(b, device=idx.device) * n).view(b, *([1] * (idx.dim() - 1)))
    flat = (idx + offset).reshape(-1)
    rows = features.reshape(b * n, c)
    if (features.requires_grad and torch.is_grad_enabled() and dispatch.fast_cpu(features)
            and features.dtype in (torch.float32, torch.float64)):
        return _GatherRows.apply(rows, flat, idx).view(*idx.shape, c)
    return rows.index_select(0, flat).view(*idx.shape, c)


class _GatherRows(torch.autograd.Function):
    """rows.index_select(0, flat) whose backward adds each gathered row's gradient to its
    source row in one pass by cloud (C kernel, csrc/gather_rows.c), or without the kernels
    multiplies the gradient by the transposed selection matrix in CSR form (torch.sparse.mm).
    Both add a source row's gradients in increasing order, so they give the same bits. The
    CSR matrix is built on the first backward through an index tensor and kept while that
    tensor lives: reused (a stage's kNN serves all its blocks, a replayed tape every step) it
    beat index_add 2-5x, but its argsort makes a fresh index tensor, as each training step's
    kNN gives, take 1.6-3.6x the time with it as with the kernel (bench/RESULTS.md)."""

    @staticmethod
    def forward(ctx, rows, flat, idx):
        ctx.num_rows = rows.shape[0]
        # idx saved too: the kernel reads it, an in-place change to it before the backward is
        # then torch's "modified by an inplace operation" error, and the saved input unpacks
        # as the same tensor object, the CSR cache's key
        ctx.save_for_backward(flat, idx)
        return rows.index_select(0, flat)

    @staticmethod
    @once_differentiable  # the gradients come from kernels or out= products: no graph
    def backward(ctx, grad):
        flat, idx = ctx.saved_tensors
        grad = grad.contiguous()
        lib = dispatch.native_for(grad)
        if lib is not None:
            out = grad.new_zeros(ctx.num_rows, grad.shape[-1])
            if flat.numel() == 0:  # nothing gathered (an empty batch, cloud or neighbourhood)
                return out, None, None
            clouds = idx.shape[0]
            dispatch.run_kernel(lib, "gather_rows_backward", dtype=grad.dtype, B=clouds,
                                S=idx.numel() // clouds, N=ctx.num_rows // clouds,
                                C=grad.shape[-1], idx=idx.reshape(clouds, -1).contiguous(),
                                grad=grad, grad_rows=out)
            return out, None, None
        structure = _gather_transposes.get(idx)
        if structure is None or structure[0].shape[0] != ctx.num_rows + 1:
            order = torch.argsort(flat, stable=True)  # each source row's gradient rows, in order
            counts = torch.bincount(flat, minlength=ctx.num_rows)
            crow = torch.zeros(ctx.num_rows + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=crow[1:])
            structure = _gather_transposes[idx] = (crow, order)
        crow, order = structure
        with warnings.catch_warnings():  # "CSR support is in beta": its matmul is what we use
            warnings.simplefilter("ignore")
            selection_t = torch.sparse_csr_tensor(
                crow, order, torch.ones(len(order), dtype=grad.dtype),
                size=(ctx.num_rows, len(order)), check_invariants=False)
            return torch.sparse.mm(selection_t, grad), None, None


_gather_transposes = WeakIdKeyDictionary()  # idx tensor -> (crow, col) of its selection^T


def group(xyz, features, new_xyz, idx, with_xyz=True):
    """Neighbourhoods for each query point.
    xyz: (B, N, 3) support, features: (B, N, C), new_xyz: (B, M, 3), idx: (B, M, k).
    Returns (B, M, k, 3 + C) with relative xyz first when with_xyz, else (B, M, k, C)."""
    grouped = gather(features, idx)
    if not with_xyz:
        return grouped
    rel = gather(xyz, idx) - new_xyz.unsqueeze(2)  # (B, M, k, 3)
    return torch.cat([rel, grouped], dim=-1)


def interpolate(src_xyz, dst_xyz, src_features, k=3):
    """Inverse-distance weighted interpolation from the k nearest source points.
    src_xyz: (B, N, 3), dst_xyz: (B, M, 3), src_features: (B, N, C) -> (B, M, C)."""
    idx, dist2 = knn_query(k, src_xyz, dst_xyz)
    weight = 1.0 / (dist2.sqrt() + 1e-8)  # (B, M, k)
    weight = weight / weight.sum(-1, keepdim=True)
    return (gather(src_features, idx) * weight.unsqueeze(-1).to(src_features.dtype)).sum(2)
