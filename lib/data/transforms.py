"""Sampling, normalisation and augmentation of one point cloud, as small functions on numpy
arrays: xyz (N, 3), normals (N, 3) or None. Random ones take a numpy Generator."""
import numpy as np
import torch


def sample_rng(random, seed, index, epoch=0):
    """The Generator for one sample, seeded by what the sample is, not by who draws it: random
    (augmented) draws by (seed, epoch, index), deterministic ones by (seed, index) alone, so an
    evaluation split reads the same points on every pass. Neither depends on the DataLoader
    worker, the process (DDP rank) or the batch the sample lands in, so a 2-process run trains
    on exactly the samples of a 1-process run, and a resumed run on those of an unbroken one."""
    if random:
        return np.random.default_rng((seed, epoch, index, _AUGMENTED))
    return np.random.default_rng((seed, index))


# A fourth word in the seed of augmented draws, so they never share a stream with the
# deterministic ones of the same (seed, index).
_AUGMENTED = 1


def set_epoch(dataset, epoch):
    """Tell a training set, and any dataset it wraps (Subset, SplitSlice), which epoch its
    random draws are for. DataLoader workers receive the dataset when an epoch's iterator
    starts, so training loaders must not keep persistent workers (lib/experiment.make_loader)."""
    while dataset is not None:
        if "epoch" in vars(dataset):
            dataset.epoch = epoch
        dataset = vars(dataset).get("dataset")


def sample_indices(num_available, num_points, rng):
    """num_points indices into a cloud: a random subset, or with replacement when it is smaller."""
    return rng.choice(num_available, num_points, replace=num_available < num_points)


def normalize_unit_sphere(xyz):
    """Centre on the centroid, scale the farthest point to radius 1 (PointNet++'s pc_normalize)."""
    centred = xyz - xyz.mean(axis=0)
    radius = np.sqrt((centred ** 2).sum(axis=1)).max()
    return centred / max(radius, 1e-12)


def random_scale(xyz, normals, rng, low, high):
    """Anisotropic scale, one factor per axis. Normals transform with the inverse of the map and
    are re-normalised, so they stay perpendicular to the stretched surface."""
    scale = rng.uniform(low, high, size=3)
    if normals is not None:
        normals = normals / scale
        normals = normals / np.linalg.norm(normals, axis=1, keepdims=True).clip(min=1e-12)
    return xyz * scale, normals


def random_shift(xyz, rng, shift):
    return xyz + rng.uniform(-shift, shift, size=3)


def jitter(xyz, rng, sigma, clip):
    """Per-point Gaussian noise, clipped (PointNet's jitter_point_cloud)."""
    return xyz + np.clip(sigma * rng.standard_normal(xyz.shape), -clip, clip)


def augment(xyz, normals, rng, scale, shift, jitter_sigma=None, jitter_clip=None):
    """Scale (low, high) per axis, then shift by up to +-shift, then optional jitter."""
    xyz, normals = random_scale(xyz, normals, rng, *scale)
    xyz = random_shift(xyz, rng, shift)
    if jitter_sigma:
        xyz = jitter(xyz, rng, jitter_sigma, jitter_clip)
    return xyz, normals
