"""ModelNet40 (and ModelNet10) in any of three released layouts, recognised from the folder's
contents:

    modelnet40_normal_resampled/   modelnet40_shape_names.txt, modelnet40_{train,test}.txt
                                   (entries like `chair_0391`), <class>/<entry>.txt with
                                   10,000 lines `x,y,z,nx,ny,nz`; the same folder ships
                                   modelnet10_{shape_names,train,test}.txt for ModelNet10
    modelnet40_ply_hdf5_2048/      shape_names.txt, {train,test}_files.txt listing
                                   ply_data_*.h5 (keys `data` (S, 2048, 3) float32,
                                   `label` (S, 1) uint8); list paths are resolved by basename;
                                   ModelNet40 only; a listed file missing is an error
    ModelNet40/ or ModelNet10/     the meshes: <class>/{train,test}/<class>_NNNN.off, classes in
                                   name order; points are sampled on the surface once
                                   (lib/data/off_mesh.py) and cached beside the folder

ModelNet has no validation split: "val" is every 10th entry of the training list and "train"
is the other nine tenths, a slice fixed by list position so that it never moves; "trainval" is
the whole training list.
"""
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lib.data import (IncompleteDataset, beside_or_cache, content_sha256, error_reason,
                      first_bad_label, note, one_level_down, read_point_table, read_text_file)
from lib.data.off_mesh import read_off, sample_surface
from lib.data.recognise import other_dataset_hint
from lib.data.transforms import augment, normalize_unit_sphere, sample_indices, sample_rng

VAL_EVERY = 10
# PCT's translate_pointcloud: per-axis scale in [2/3, 3/2] and shift in [-0.2, 0.2].
AUGMENT = dict(scale=(2 / 3, 3 / 2), shift=0.2)
JITTER = dict(jitter_sigma=0.01, jitter_clip=0.05)


MODELNET10_CLASSES = ("bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand",
                      "sofa", "table", "toilet")
LAYOUTS = {
    "normal_resampled": "modelnet40_normal_resampled (<class>/<entry>.txt: x,y,z,nx,ny,nz)",
    "hdf5": "modelnet40_ply_hdf5_2048 (ply_data_*.h5 with data, label)",
    "off": "ModelNet40.zip / ModelNet10.zip meshes (<class>/{train,test}/*.off)",
}
# Points sampled per mesh and cached; the resampled release has 10,000, 2,048 keep the cache
# near the hdf5 release's size. A larger --num-points samples (and caches) that many.
OFF_POINTS = 2048
OFF_SEED = 0  # the sampling is part of the data's definition, like the resampled release's


def val_mask(positions, root):
    """Which present training shapes (by their positions in the training list) are "val": every
    VAL_EVERY-th list entry. Where none of those is present (a partial download), a fixed tenth
    of the present shapes instead (lib/data/val_slice's, printed), so that training still
    validates on shapes it leaves out; a full download never gets there."""
    positions = np.asarray(positions)
    mask = positions % VAL_EVERY == VAL_EVERY - 1
    if mask.any() or len(positions) < 2:
        return mask
    from lib.data.val_slice import val_slice  # it imports lib.data's builders
    mask[val_slice(len(positions))[0]] = True
    note(f"[modelnet40] {root}: none of the training list's every-{VAL_EVERY}th entries is "
          f"present; val is a fixed tenth of the {len(positions)} present training shapes")
    return mask


def find_layout(root):
    """The layout of the folder `root`, or None."""
    if (root / "modelnet40_shape_names.txt").is_file():
        return "normal_resampled"
    if (root / "shape_names.txt").is_file():
        return "hdf5"
    if any(root.glob("*/train/*.off")) or any(root.glob("*/test/*.off")):
        return "off"
    return None


def detect_layout(root):
    layout = find_layout(root)
    if layout is None:
        inside = one_level_down(root, lambda folder: find_layout(folder) is not None)
        # a subfolder of its own named, another dataset's layout would be beside the point
        hint = "" if inside else other_dataset_hint(root, "modelnet40")
        raise FileNotFoundError(f"{root}: not a ModelNet40 folder{inside}; supported: "
                                f"{'; '.join(LAYOUTS.values())}{hint}")
    return layout


def read_lines(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return [line.strip() for line in read_text_file(path).splitlines() if line.strip()]


# What other repositories cache beside the lists, in place of the shapes' files: Point-BERT's and
# Point-MAE's modelnet40_<split>_8192pts_fps.dat, Pointcept's modelnet40_<split>_*.pth records
OTHER_CACHES = ("*.dat", "*.pth")


def report_missing(list_file, missing, listed, what="shape files"):
    if missing == listed:
        caches = sorted(p.name for pattern in OTHER_CACHES for p in list_file.parent.glob(pattern))
        held = (f" (the folder holds {', '.join(caches[:3])}: another repository's cache of "
                f"the shapes, which is not read; the shapes' own files are)" if caches else "")
        raise FileNotFoundError(f"{list_file}: none of the {listed} listed {what} exists{held}")
    if missing:
        note(f"[modelnet40] {list_file}: {missing} of {listed} listed {what} are missing; "
              f"using the {listed - missing} present")


def read_normal_resampled(root, list_split, num_points, variant=40):
    """-> (class names, clouds [(n <= num_points, 6)], labels, list positions, each cloud's
    file). Only the first num_points lines of each file are read: the file order is already a
    random resampling."""
    names = read_lines(root / f"modelnet{variant}_shape_names.txt")
    list_file = root / f"modelnet{variant}_{list_split}.txt"
    clouds, labels, positions, files = [], [], [], []
    entries = read_lines(list_file)
    for position, entry in enumerate(entries):
        name = entry.rsplit("_", 1)[0]  # night_stand_0001 -> night_stand
        if name not in names:
            raise ValueError(f"{list_file}: entry {entry!r}: class {name!r} is not in "
                             f"modelnet{variant}_shape_names.txt")
        path = root / name / f"{entry}.txt"
        if path.is_file():
            clouds.append(read_point_table(path, 6, delimiter=",", max_rows=num_points))
            labels.append(names.index(name))
            positions.append(position)
            files.append(path)
    report_missing(list_file, len(entries) - len(clouds), len(entries))
    return names, clouds, labels, positions, files


def read_hdf5(root, list_split, num_points, variant=40):
    """-> (class names, clouds (S, <= num_points, 3), labels, positions in the concatenation,
    each cloud's file)."""
    import h5py
    if variant != 40:
        raise FileNotFoundError(f"{root}: modelnet40_ply_hdf5_2048 holds no ModelNet{variant}; "
                                f"use modelnet40_normal_resampled (it ships modelnet10 lists) "
                                f"or ModelNet10.zip")
    names = read_lines(root / "shape_names.txt")
    list_file = root / f"{list_split}_files.txt"
    # the release lists data/modelnet40_ply_hdf5_2048/<file>
    paths = [root / Path(entry).name for entry in read_lines(list_file)]
    check_all_listed_h5_present(list_file, paths)
    clouds, labels, positions, seen = [], [], [], 0
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                data, label = f["data"][:, :num_points], f["label"][:].reshape(-1)
        # TypeError, ValueError, IndexError: `data` or `label` a group, or of another rank
        except (OSError, KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{path}: not an h5 file with `data` and `label` "
                             f"({error_reason(err)})") from None
        if data.ndim != 3 or data.shape[2] != 3 or len(label) != len(data):
            raise ValueError(f"{path}: expected data (S, N, 3) and label (S, 1), got "
                             f"{data.shape} and {label.shape}")
        bad = ~np.isfinite(data).all(axis=(1, 2))
        if bad.any():
            raise ValueError(f"{path}: sample {int(np.argmax(bad))}: NaN coordinates")
        i = first_bad_label(label, 0, len(names))  # -1 would index the last class, 8.5 be 8
        if i is not None:
            raise ValueError(f"{path}: sample {i}: label {label[i]:g} is not an integer in "
                             f"0..{len(names) - 1}")
        clouds.append(data.astype(np.float32))
        labels.append(label.astype(np.int64))
        positions.append(seen + np.arange(len(data)))
        seen += len(data)
    files = [path for path, data in zip(paths, clouds) for _ in range(len(data))]
    return (names, np.concatenate(clouds), np.concatenate(labels), np.concatenate(positions),
            files)


def check_all_listed_h5_present(list_file, paths):
    """A listed h5 file that is missing is an error, not skipped as a missing shape file of the
    resampled layout is: a shape's position here counts the shapes of the files before it, so a
    file left out would move which shapes are "val" (every VAL_EVERY-th position), and with
    five training files a missing one is a fifth of the split."""
    if not paths:
        raise FileNotFoundError(f"{list_file}: lists no h5 files")
    missing = [path.name for path in paths if not path.is_file()]
    if len(missing) == len(paths):  # the split is not there at all: not a damaged copy
        report_missing(list_file, len(missing), len(paths), "h5 files")
    if missing:
        raise IncompleteDataset(f"{list_file}: lists {', '.join(missing)}, missing from "
                                f"{list_file.parent} ({len(missing)} of {len(paths)} h5 files; "
                                f"read without them the split would shrink and, for train, "
                                f"val would move): unpack modelnet40_ply_hdf5_2048.zip again")


def read_off_meshes(root, list_split, num_points, variant=40, cache_dir=None):
    """-> (class names, clouds [(P, 6)], labels, list positions, meshes) of the meshes of a
    split, each sampled once with OFF_POINTS (or num_points, if more) points and cached as .npy."""
    names = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir())
    if variant == 10 and len(names) != 10:
        names = [name for name in names if name in MODELNET10_CLASSES]
    if len(names) != variant:  # a partial download: the classifier gets that many outputs
        note(f"[modelnet] {root}: {len(names)} class folders, where ModelNet{variant} has "
              f"{variant}: the classes are the ones present")
    count = max(num_points, OFF_POINTS)
    cache = Path(cache_dir) if cache_dir else default_cache_dir(root, count)
    # "._<name>.off": the AppleDouble files of metadata that macOS writes beside each file it
    # copies to a drive of another file system (FAT, exFAT, a network share): not meshes
    meshes = [(label, path) for label, name in enumerate(names)
              for path in sorted((root / name / list_split).glob("*.off"))
              if not path.name.startswith("._")]
    if not meshes:
        raise FileNotFoundError(f"{root}: no <class>/{list_split}/*.off meshes")
    check_every_class_has_meshes(root, names, {label for label, _ in meshes}, list_split)
    clouds = []
    for label, path in meshes:
        cached = cache / names[label] / list_split / f"{path.stem}.npy"
        if cached.is_file() and cached.stat().st_mtime >= path.stat().st_mtime:
            cloud = read_cached_sample(cached, count)
            if cloud is not None:
                clouds.append(cloud)
                continue
        if not clouds or len(clouds) % 1000 == 0:
            note(f"[modelnet] sampling {count} points on the meshes of {root} into {cache} "
                  f"(once; {len(clouds)} of {len(meshes)} {list_split} meshes done)", flush=True)
        # One stream per mesh, fixed by its name: the cache can be rebuilt in any order.
        rng = np.random.default_rng([OFF_SEED, zlib.crc32(f"{names[label]}/{path.name}".encode())])
        cloud = sample_surface(path, *read_off(path), count, rng)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, cloud)
        os.replace(tmp, cached)  # atomic: a parallel rank or an interrupted run leaves no half file
        clouds.append(cloud)
    return (names, clouds, [label for label, _ in meshes], list(range(len(meshes))),
            [path for _, path in meshes])


def check_every_class_has_meshes(root, names, labels_held, list_split):
    """A class whose split folder holds no mesh (emptied, or a copy stopped part-way) is an
    error: it would stay among the classifier's outputs with no shape to learn or score it,
    unsaid, since the count of class folders is right. A class folder that is gone (no train/ or
    test/ in it) leaves the class out instead, as the line on the count of classes says."""
    empty = [root / name / list_split for label, name in enumerate(names)
             if label not in labels_held]
    if empty:
        more = f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise IncompleteDataset(f"{empty[0]}: no .off meshes{more}, where the "
                                f"{len(names) - len(empty)} other classes' {list_split}/ folders "
                                f"hold some: the class would have no shape in this split; "
                                f"restore its meshes, or remove its folder to leave it out")


def read_cached_sample(path, count):
    """A mesh's cached (count, 6) sample, or None (after a line saying so) where the file is
    not one, damaged by a copy or a full disk: it is sampled again."""
    try:
        cloud = np.load(path, allow_pickle=False)
        if cloud.shape == (count, 6) and cloud.dtype == np.float32:
            return cloud
        reason = f"shape {cloud.shape}, {cloud.dtype}"
    except (ValueError, OSError, EOFError) as err:
        reason = error_reason(err)
    note(f"[modelnet] {path}: not a sample of {count} points ({reason}); sampling it again",
          flush=True)
    return None


def default_cache_dir(root, count):
    """<root>_sampled<count>/ beside the meshes (as lib/data/s3dis.py's converted rooms: also
    when the folder is read-only but holds it, sampled by whoever could write there), or else
    under data/cache/ in a folder named after the meshes' whole path too: named after their
    folder alone, two read-only copies (ModelNet40/ on two shares, one of them changed) shared
    one cache, and the second read the first one's samples."""
    beside = root.parent / f"{root.name}_sampled{count}"
    return Path(beside_or_cache(beside, beside.name, root))


READERS = {"normal_resampled": read_normal_resampled, "hdf5": read_hdf5, "off": read_off_meshes}


class ModelNet40Dataset(torch.utils.data.Dataset):
    """Sample: xyz (N, 3) in the unit sphere, feat = normals (N, 3) where the layout has them,
    else xyz, label (). The first N points of each shape (the usual choice for both layouts);
    a shape with fewer is topped up by sampling with replacement."""
    task = "cls"
    in_channels = 3

    def __init__(self, root, split="train", num_points=1024, augment=False, seed=0, jitter=False,
                 variant=40, cache_dir=None):
        self.root = Path(root)
        self.num_points, self.augment, self.seed = num_points, augment, seed
        self.epoch = 0  # set by lib.data.transforms.set_epoch: the epoch augmentation draws for
        self.augmentation = dict(AUGMENT, **(JITTER if jitter else {}))
        self.layout = detect_layout(self.root)
        note(f"[modelnet] {self.root}: {LAYOUTS[self.layout]}, ModelNet{variant}")
        list_split = "test" if split == "test" else "train"
        cache = {"cache_dir": cache_dir} if self.layout == "off" else {}  # where samples go
        self.class_names, clouds, labels, positions, files = READERS[self.layout](
            self.root, list_split, num_points, variant, **cache)
        self.num_classes = len(self.class_names)
        self.features = "xyz" if self.layout == "hdf5" else "normals"
        if split in ("test", "trainval"):
            keep = np.ones(len(labels), dtype=bool)
        else:
            keep = val_mask(positions, self.root) == (split == "val")
        self.clouds = [cloud for cloud, kept in zip(clouds, keep) if kept]
        self.files = [path for path, kept in zip(files, keep) if kept]  # each cloud's file
        self.labels = np.asarray(labels, dtype=np.int64)[keep]
        if not self.clouds:
            raise FileNotFoundError(f"{self.root}: the {split} split has no shapes present")

    def source_files(self):
        """The files the split's shapes are read from (lib/data.file_listing): each shape's
        file or mesh (the source of its cached sample), or the h5 files with the number of the
        split's shapes each holds."""
        held = Counter(self.files)
        return [(path, count if self.layout == "hdf5" else None) for path, count in held.items()]

    def content_sha256(self, indices=None):
        """SHA-256 of the shapes at `indices` (all by default), in that order: each one's label
        and points (lib/data/val_slice.val_sha256)."""
        return content_sha256((str(self.labels[i]), self.clouds[i])
                              for i in (range(len(self)) if indices is None else indices))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        cloud = self.clouds[index]
        rng = sample_rng(self.augment, self.seed, index, self.epoch)
        if len(cloud) < self.num_points:
            cloud = cloud[sample_indices(len(cloud), self.num_points, rng)]
        xyz = normalize_unit_sphere(cloud[:self.num_points, :3])
        normals = cloud[:self.num_points, 3:] if cloud.shape[1] == 6 else None
        if self.augment:
            xyz, normals = augment(xyz, normals, rng, **self.augmentation)
        feat = xyz if normals is None else normals
        return {"xyz": torch.from_numpy(xyz.astype(np.float32)),
                "feat": torch.from_numpy(feat.astype(np.float32)),
                "label": torch.tensor(self.labels[index])}
