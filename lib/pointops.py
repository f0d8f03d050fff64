"""Geometry operations on batched point clouds.

Convention used everywhere in this repository: a batch of clouds is dense, `xyz` is (B, N, 3)
and features are (B, N, C), channels last. A single large cloud (an S3DIS room) is B = 1.
Index tensors are int64 and index the N axis of their own batch element.

Every operation has a pure-torch reference (runs on any device). The fast CPU path is chosen
by `set_backend`; "reference" forces the pure-torch path (benchmarks compare the two).
"""
import torch

_BACKEND = "auto"  # "auto": fast path for CPU tensors where one exists; "reference": pure torch


def set_backend(name):
    global _BACKEND
    if name not in ("auto", "reference"):
        raise ValueError(f"unknown pointops backend {name!r}; use 'auto' or 'reference'")
    _BACKEND = name


def get_backend():
    return _BACKEND


def start_index(xyz):
    """FPS start: the point farthest from the centroid, so the sample does not depend on
    point order (permuting the input permutes, but does not change, the sampled set).
    xyz: (B, N, 3) -> (B,) int64."""
    centroid = xyz.mean(dim=1, keepdim=True)  # (B, 1, 3)
    return ((xyz - centroid) ** 2).sum(-1).argmax(dim=1)


def farthest_point_sample_reference(xyz, m):
    """Exact farthest point sampling. xyz: (B, N, 3) -> (B, m) int64, first = start_index."""
    b, n, _ = xyz.shape
    xyz = xyz.detach()
    idx = torch.empty(b, m, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = start_index(xyz)
    batch = torch.arange(b, device=xyz.device)
    for i in range(m):
        idx[:, i] = farthest
        d = ((xyz - xyz[batch, farthest].unsqueeze(1)) ** 2).sum(-1)  # (B, N)
        dist = torch.minimum(dist, d)
        farthest = dist.argmax(dim=1)
    return idx


def farthest_point_sample(xyz, m):
    """(B, N, 3) -> (B, m) int64 indices of an exact FPS starting at start_index."""
    return farthest_point_sample_reference(xyz, m)


def knn_query_reference(k, support, query, chunk=4096):
    """k nearest support points of each query point (the point itself included when it is in
    the support set). support: (B, N, 3), query: (B, M, 3) -> (idx (B, M, k) int64,
    squared distances (B, M, k)), nearest first. Chunked over M to bound memory on rooms."""
    support = support.detach()
    query = query.detach()
    idx_chunks, dist_chunks = [], []
    for start in range(0, query.shape[1], chunk):
        q = query[:, start:start + chunk]
        d = torch.cdist(q, support) ** 2  # (B, m, N)
        dist, idx = d.topk(k, dim=-1, largest=False, sorted=True)
        idx_chunks.append(idx)
        dist_chunks.append(dist)
    return torch.cat(idx_chunks, 1), torch.cat(dist_chunks, 1)


def knn_query(k, support, query):
    """See knn_query_reference."""
    return knn_query_reference(k, support, query)


def gather(features, idx):
    """Rows of `features` at `idx`, per batch element.
    features: (B, N, C), idx: (B, *S) int64 -> (B, *S, C).
    A flattened index_select: its backward (index_add) is faster than advanced indexing's."""
    b, n, c = features.shape
    offset = (torch.arange(b, device=idx.device) * n).view(b, *([1] * (idx.dim() - 1)))
    flat = (idx + offset).reshape(-1)
    return features.reshape(b * n, c).index_select(0, flat).view(*idx.shape, c)


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
