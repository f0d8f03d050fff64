"""Voxel-grid subsampling and fixed-size crops of large point clouds (S3DIS rooms).

A room is grouped once into grid cells (`grid_cells`); a *pass* then takes one point per
occupied cell, which is exactly a grid subsampling of the room. Training draws a random point
per cell; testing cycles through each cell's points (pass p takes the p-th one, as the Point
Transformer test script does), so that every original point appears in some pass. A crop is
the `num_points` nearest neighbours of a centre point within a pass (a kNN "sphere" crop).
"""
import numpy as np


def grid_cells(xyz, cell_size, rng=None):
    """Group points by grid cell (origin at the cloud's minimum corner).
    xyz: (N, 3) -> (order (N,), starts (M,), counts (M,)) int64: cell m holds the points
    order[starts[m] : starts[m] + counts[m]]. With `rng`, the order inside each cell is shuffled
    (so "the p-th point of a cell" is a random one), otherwise it keeps the input order."""
    ijk = np.floor((xyz - xyz.min(0)) / cell_size).astype(np.int64)  # (N, 3)
    dims = ijk.max(0) + 1
    key = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]
    if rng is None:
        order = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((rng.random(len(key)), key))
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    counts = np.diff(np.r_[starts, len(key)])
    return order, starts, counts


def random_pass(starts, counts, rng):
    """One uniformly random point per cell: (M,) positions in the cell order (training)."""
    return starts + (rng.random(len(counts)) * counts).astype(np.int64)


def cycling_pass(starts, counts, p):
    """The p-th point of each cell, cycling in cells with fewer points: (M,) positions.
    A point at rank r in its cell is seen for the first time in pass r."""
    return starts + p % counts


def grid_subsample(xyz, cell_size, rng=None):
    """Indices (M,) int64 keeping one point per occupied cell: a random one with `rng`
    (training), else the first in input order."""
    order, starts, counts = grid_cells(xyz, cell_size)
    return order[starts if rng is None else random_pass(starts, counts, rng)]


def knn_crop(xyz, centre, num_points):
    """Indices of the `num_points` points of xyz (M, 3) nearest to xyz[centre], in no
    particular order; all M indices when M <= num_points. Deterministic for equal inputs."""
    if len(xyz) <= num_points:
        return np.arange(len(xyz))
    dist2 = ((xyz - xyz[centre]) ** 2).sum(1)  # (M,)
    return np.argpartition(dist2, num_points - 1)[:num_points]


def pad_by_resampling(idx, num_points, rng):
    """Exactly num_points indices: idx itself, plus random repeats of its entries if short."""
    if len(idx) >= num_points:
        return idx
    return np.concatenate([idx, rng.choice(idx, num_points - len(idx))])


def covering_crops(xyz, starts, counts, num_points):
    """Crops that together contain every point, each a kNN crop within a cycling pass.
    xyz: (N, 3) points in cell order (see grid_cells). Returns (K, 2) int64 rows
    (pass p, centre position within that pass's cloud). In pass p only the points seen for the
    first time (cells with more than p points) need covering, so late passes, where only dense
    cells remain, cost a few crops; centres sweep the pass in cell-key (x-major) order."""
    crops = []
    for p in range(int(counts.max())):
        pass_xyz = xyz[cycling_pass(starts, counts, p)]  # (M, 3)
        pending = counts > p  # (M,)
        centre = int(pending.argmax())
        while pending[centre]:
            pending[knn_crop(pass_xyz, centre, num_points)] = False
            crops.append((p, centre))
            centre = int(pending.argmax())
    return np.array(crops, dtype=np.int64).reshape(-1, 2)
