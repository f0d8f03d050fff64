"""ShapeNet part in any of its three released forms, recognised from the folder's contents:

v0_normal (shapenetcore_partanno_segmentation_benchmark_v0_normal):
    synsetoffset2category.txt                    `Name<TAB>synset` per category, in category order
    train_test_split/shuffled_{train,val,test}_file_list.json   ["shape_data/<synset>/<id>", ...]
    <synset>/<id>.txt                            `x y z nx ny nz label`, label = global part id
    part_ranges.json (synthetic data only)       {category: {"range": [start, stop], "parts": [..]}}
v0 (shapenetcore_partanno_segmentation_benchmark_v0): the same category file and split lists;
    <synset>/points/<id>.pts `x y z` and <synset>/points_label/<id>.seg, one label per line,
    numbered 1..k within the category; no normals
hdf5 (shapenet_part_seg_hdf5_data; the zip unpacks as hdf5_data/): lib/data/shapenet_part_h5.py

A split is exactly its list file: the official lists put 35 shapes in two splits, and such a
shape belongs to both ("trainval" = train then val, each shape once). Every listed file is
parsed once, up front, so a broken file fails at construction with its name and line, not
inside a DataLoader worker. Layouts without normals feed xyz as the features.
"""
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lib.data import (content_sha256, first_bad_label, note, one_level_down, read_point_table,
                      read_text_file)
from lib.data.recognise import other_dataset_hint
from lib.data.shapenet_part_h5 import CATEGORY_FILE as H5_CATEGORY_FILE, find_h5_folder, read_h5_split
from lib.data.shapenet_part_h5 import split_files as h5_split_files
from lib.data.transforms import augment, normalize_unit_sphere, sample_indices, sample_rng

CATEGORY_FILE = "synsetoffset2category.txt"
PART_RANGES_FILE = "part_ranges.json"
# Global part ids of the official release, half-open [start, stop) per category.
OFFICIAL_PART_RANGES = {
    "Airplane": (0, 4), "Bag": (4, 6), "Cap": (6, 8), "Car": (8, 12), "Chair": (12, 16),
    "Earphone": (16, 19), "Guitar": (19, 22), "Knife": (22, 24), "Lamp": (24, 28),
    "Laptop": (28, 30), "Motorbike": (30, 36), "Mug": (36, 38), "Pistol": (38, 41),
    "Rocket": (41, 44), "Skateboard": (44, 47), "Table": (47, 50),
}
# Standard ShapeNet part training augmentation (PointNet++ / Point Transformer); no rotation,
# the shapes are aligned.
AUGMENT = dict(scale=(0.8, 1.25), shift=0.1, jitter_sigma=0.01, jitter_clip=0.05)
ENTRY = re.compile(r"shape_data/([^/]+)/([^/]+)")  # some real ids hold dashes


def read_categories(path):
    """-> (category names, synsets), both in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the category list `Name<TAB>synset`)")
    names, synsets = [], []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}: line {number}: expected `Name<TAB>synset`, got {line!r}")
        for kind, value, seen in (("category", fields[0], names), ("synset", fields[1], synsets)):
            if value in seen:  # a second entry would shadow the first in every per-category table
                raise ValueError(f"{path}: line {number}: {kind} {value} is listed twice")
        names.append(fields[0])
        synsets.append(fields[1])
    if not names:
        raise ValueError(f"{path}: no categories listed")
    return names, synsets


def read_part_ranges(root, category_names):
    """-> (part_ranges [(start, stop)] in category order, part names indexed by global id).

    A `part_ranges.json` in the root (written by the synthetic generator) overrides the official
    table. The release names no parts, so official part names are `<Category>_<k>`.
    """
    path = root / PART_RANGES_FILE
    if not path.is_file():
        unknown = [name for name in category_names if name not in OFFICIAL_PART_RANGES]
        if unknown:
            raise ValueError(f"{root / CATEGORY_FILE}: categories {unknown} have no official "
                             f"part range and there is no {PART_RANGES_FILE}")
        # Global ids stay the official 0..49 even when the category file lists fewer categories.
        part_names = [f"{name}_{k}" for name, (start, stop) in OFFICIAL_PART_RANGES.items()
                      for k in range(stop - start)]
        return [OFFICIAL_PART_RANGES[name] for name in category_names], part_names
    try:
        table = json.loads(read_text_file(path))
        spec = [(tuple(table[name]["range"]), list(table[name]["parts"]))
                for name in category_names]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{category: {{\"range\": [start, stop], "
                         f"\"parts\": [names]}}}} for every category ({err!r})") from None
    part_names = [None] * max(stop for (_, stop), _ in spec)
    for name, ((start, stop), names) in zip(category_names, spec):
        if not 0 <= start < stop or len(names) != stop - start:
            raise ValueError(f"{path}: {name}: range [{start}, {stop}) does not fit its "
                             f"{len(names)} part names")
        if any(part_names[start:stop]):
            raise ValueError(f"{path}: {name}: range [{start}, {stop}) overlaps another category")
        part_names[start:stop] = names
    if None in part_names:
        raise ValueError(f"{path}: part id {part_names.index(None)} belongs to no category")
    return [r for r, _ in spec], part_names


LAYOUTS = {
    "v0_normal": "shapenetcore_partanno_segmentation_benchmark_v0_normal "
                 "(<synset>/<id>.txt: x y z nx ny nz label)",
    "v0": "shapenetcore_partanno_segmentation_benchmark_v0 "
          "(<synset>/points/<id>.pts + <synset>/points_label/<id>.seg, no normals)",
    "hdf5": "shapenet_part_seg_hdf5_data (ply_data_*.h5 with data, label, pid; no normals)",
}


def find_layout(root):
    """-> (layout, the folder holding its files), or None."""
    h5_folder = find_h5_folder(root)
    if h5_folder is not None:
        return "hdf5", h5_folder
    if (root / CATEGORY_FILE).is_file():
        v0 = any(p.is_dir() for p in root.glob("*/points"))
        return ("v0" if v0 else "v0_normal"), root
    return None


def detect_layout(root):
    """-> (layout, the folder holding its files)."""
    found = find_layout(root)
    if found is not None:
        return found
    inside = one_level_down(root, lambda folder: find_layout(folder) is not None)
    # a subfolder of its own named, another dataset's layout would be beside the point
    hint = "" if inside else other_dataset_hint(root, "shapenet_part")
    raise FileNotFoundError(f"{root}: no ShapeNet part layout found (no {CATEGORY_FILE} or "
                            f"ply_data_*.h5){inside}; supported: {'; '.join(LAYOUTS.values())}"
                            f"{hint}")


def read_split(path, synsets):
    """-> [(category index, synset, shape id)] in list order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the split's shape list)")
    try:
        listed = json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON list ({err})") from None
    if not isinstance(listed, list):
        raise ValueError(f"{path}: not a JSON list (a {type(listed).__name__})")
    entries = []
    for entry in listed:
        match = ENTRY.fullmatch(str(entry))
        if not match:
            raise ValueError(f"{path}: entry {entry!r} is not shape_data/<synset>/<id>")
        synset, shape_id = match.groups()
        if synset not in synsets:
            raise ValueError(f"{path}: entry {entry!r}: synset {synset} is not in {CATEGORY_FILE}")
        entries.append((synsets.index(synset), synset, shape_id))
    return entries


class ShapeNetPartDataset(torch.utils.data.Dataset):
    """Sample: xyz (N, 3) in the unit sphere, feat = normals (N, 3) (xyz where the layout has
    none), label = global part ids (N,), category (). Points are a random subset when augmenting
    (with replacement if the shape has fewer than N), else a subset fixed by (seed, index)."""
    task = "partseg"
    in_channels = 3

    def __init__(self, root, split="train", num_points=2048, augment=False, seed=0):
        self.root = Path(root)
        self.split, self.num_points, self.augment, self.seed = split, num_points, augment, seed
        self.epoch = 0  # set by lib.data.transforms.set_epoch: the epoch augmentation draws for
        self.layout, folder = detect_layout(self.root)
        note(f"[shapenet_part] {self.root}: {LAYOUTS[self.layout]}")
        self.folder = folder  # the hdf5 release's files may lie one level down
        if self.layout == "hdf5":
            self.category_names, _ = read_categories(folder / H5_CATEGORY_FILE)
            self.part_ranges, self.class_names = read_part_ranges(folder, self.category_names)
            shapes = read_h5_split(folder, split, self.category_names, self.part_ranges)
            self.split_sources = [str(path) for path in h5_split_files(folder, split)
                                  if path.is_file()]
        else:
            self.category_names, synsets = read_categories(self.root / CATEGORY_FILE)
            self.part_ranges, self.class_names = read_part_ranges(self.root, self.category_names)
            shapes = self._read_listed(split, synsets)
        self.num_classes = len(self.class_names)
        self.features = "normals" if shapes[0][1].shape[1] == 6 else "xyz"
        self._store(shapes)

    def _read_listed(self, split, synsets):
        """-> [(category, points (n, 6 or 3), labels (n,) int16, shape id)] of the listed shapes
        whose files are present; the missing ones are counted in one line."""
        split_dir = self.root / "train_test_split"
        split_files = [split_dir / f"shuffled_{s}_file_list.json"
                       for s in (("train", "val") if split == "trainval" else (split,))]
        entries = list(dict.fromkeys(e for f in split_files for e in read_split(f, synsets)))
        self.split_sources = [str(f) for f in split_files]
        read_shape = self._read_v0_shape if self.layout == "v0" else self._read_v0_normal_shape
        shapes = [shape for shape in (read_shape(*entry) for entry in entries) if shape]
        listed = " + ".join(str(f) for f in split_files)
        if not shapes:
            wanted = "<synset>/points/<id>.pts" if self.layout == "v0" else "<synset>/<id>.txt"
            raise FileNotFoundError(f"{self.root}: none of the {len(entries)} shapes listed in "
                                    f"{listed} has its {wanted} file")
        if len(shapes) < len(entries):
            note(f"[shapenet_part] {listed}: {len(entries) - len(shapes)} of {len(entries)} listed "
                  f"shapes have no file under {self.root}; using the {len(shapes)} present")
        return shapes

    def _read_v0_normal_shape(self, category, synset, shape_id):
        path = self.root / synset / f"{shape_id}.txt"
        if not path.is_file():
            return None
        table = read_point_table(path, 7)
        return (category, table[:, :6], self._checked_labels(path, table[:, 6], category),
                f"{synset}/{shape_id}")

    def _read_v0_shape(self, category, synset, shape_id):
        points_path = self.root / synset / "points" / f"{shape_id}.pts"
        labels_path = self.root / synset / "points_label" / f"{shape_id}.seg"
        if not points_path.is_file():
            return None
        if not labels_path.is_file():
            raise ValueError(f"{labels_path}: missing (the labels of {points_path.name})")
        points = read_point_table(points_path, 3)
        labels = read_point_table(labels_path, 1)[:, 0]
        if len(labels) != len(points):
            raise ValueError(f"{labels_path}: {len(labels)} labels for the {len(points)} points "
                             f"of {points_path.name}")
        start, stop = self.part_ranges[category]
        # v0 numbers a category's parts 1..k; the global id is start + label - 1
        return (category, points, self._checked_labels(labels_path, labels + start - 1, category,
                                                       shown_offset=1 - start),
                f"{synset}/{shape_id}")

    def _checked_labels(self, path, labels, category, shown_offset=0):
        start, stop = self.part_ranges[category]
        row = first_bad_label(labels, start, stop)
        if row is not None:
            raise ValueError(f"{path}: line {row + 1}: label {labels[row] + shown_offset:g} is "
                             f"not a part of {self.category_names[category]} "
                             f"({start + shown_offset}..{stop - 1 + shown_offset})")
        return labels.astype(np.int16)

    def _store(self, shapes):
        """All shapes concatenated: points (total, C), labels (total,), offsets (S + 1,)."""
        self.points = np.concatenate([points for _, points, _, _ in shapes])
        self.labels = np.concatenate([labels for _, _, labels, _ in shapes])
        self.offsets = np.cumsum([0] + [len(points) for _, points, _, _ in shapes])
        self.categories = np.asarray([c for c, _, _, _ in shapes], dtype=np.int64)
        self.shape_ids = [shape_id for _, _, _, shape_id in shapes]

    def source_files(self):
        """The files the split's shapes are read from (lib/data.file_listing): each shape's
        file, or its two (v0), or the h5 files with the number of shapes each holds."""
        if self.layout == "hdf5":  # shape ids are <file>:<index>
            held = Counter(shape_id.rsplit(":", 1)[0] for shape_id in self.shape_ids)
            return [(self.folder / name, count) for name, count in held.items()]
        per_shape = ((("points", ".pts"), ("points_label", ".seg")) if self.layout == "v0"
                     else (("", ".txt"),))
        return [(self.root / synset / folder / f"{shape_id}{suffix}", None)
                for synset, shape_id in (name.split("/") for name in self.shape_ids)
                for folder, suffix in per_shape]

    def content_sha256(self, indices=None):
        """SHA-256 of the shapes at `indices` (all by default), in that order: each one's id,
        category, points and labels (lib/data/val_slice.val_sha256)."""
        def shape(index):
            start, stop = self.offsets[index], self.offsets[index + 1]
            return (f"{self.shape_ids[index]} {self.categories[index]}",
                    self.points[start:stop], self.labels[start:stop])
        return content_sha256(shape(i) for i in (range(len(self)) if indices is None else indices))

    def __len__(self):
        return len(self.categories)

    def __getitem__(self, index):
        start, stop = self.offsets[index], self.offsets[index + 1]
        points, labels = self.points[start:stop], self.labels[start:stop]
        rng = sample_rng(self.augment, self.seed, index, self.epoch)
        xyz = normalize_unit_sphere(points[:, :3])  # the whole shape's sphere, not the subset's
        choice = sample_indices(stop - start, self.num_points, rng)
        xyz, labels = xyz[choice], labels[choice]
        normals = points[choice, 3:6] if self.features == "normals" else None
        if self.augment:
            xyz, normals = augment(xyz, normals, rng, **AUGMENT)
        feat = xyz if normals is None else normals
        return {"xyz": torch.from_numpy(xyz.astype(np.float32)),
                "feat": torch.from_numpy(feat.astype(np.float32)),
                "label": torch.from_numpy(labels.astype(np.int64)),
                "category": torch.tensor(self.categories[index])}
