"""ShapeNet part (shapenetcore_partanno_segmentation_benchmark_v0_normal), read as released:

    synsetoffset2category.txt                    `Name<TAB>synset` per category, in category order
    train_test_split/shuffled_{train,val,test}_file_list.json   ["shape_data/<synset>/<id>", ...]
    <synset>/<id>.txt                            `x y z nx ny nz label`, label = global part id
    part_ranges.json (synthetic data only)       {category: {"range": [start, stop], "parts": [..]}}

A split is exactly its list file: the official lists put 35 shapes in two splits, and such a
shape belongs to both. Every listed file is parsed once, up front, so a broken file fails at
construction with its name and line, not inside a DataLoader worker.
"""
import json
import re
from pathlib import Path

import numpy as np
import torch

from lib.data import read_point_table
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
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}: line {number}: expected `Name<TAB>synset`, got {line!r}")
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
        table = json.loads(path.read_text())
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


def read_split(path, synsets):
    """-> [(category index, synset, shape id)] in list order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the split's shape list)")
    try:
        listed = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not a JSON list ({err})") from None
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
    """Sample: xyz (N, 3) in the unit sphere, feat = normals (N, 3), label = global part ids (N,),
    category (). Points are a random subset when augmenting (with replacement if the shape has
    fewer than N), else a subset fixed by (seed, index)."""
    task = "partseg"
    in_channels = 3

    def __init__(self, root, split="train", num_points=2048, augment=False, seed=0):
        self.root = Path(root)
        self.split, self.num_points, self.augment, self.seed = split, num_points, augment, seed
        self.category_names, synsets = read_categories(self.root / CATEGORY_FILE)
        self.part_ranges, self.class_names = read_part_ranges(self.root, self.category_names)
        self.num_classes = len(self.class_names)
        split_file = self.root / "train_test_split" / f"shuffled_{split}_file_list.json"
        self._load(split_file, read_split(split_file, synsets))

    def _load(self, split_file, entries):
        """All present shapes concatenated: points (total, 6), labels (total,), offsets (S + 1,)."""
        points, labels, categories, self.shape_ids = [], [], [], []
        for category, synset, shape_id in entries:
            path = self.root / synset / f"{shape_id}.txt"
            if not path.is_file():
                continue
            table = read_point_table(path, 7)
            labels.append(self._checked_labels(path, table[:, 6], category))
            points.append(table[:, :6])
            categories.append(category)
            self.shape_ids.append(f"{synset}/{shape_id}")
        missing = len(entries) - len(points)
        if not points:
            raise FileNotFoundError(f"{self.root}: none of the {len(entries)} shapes listed in "
                                    f"{split_file} has its <synset>/<id>.txt file")
        if missing:
            print(f"[shapenet_part] {split_file}: {missing} of {len(entries)} listed shapes have "
                  f"no file under {self.root}; using the {len(points)} present")
        self.points = np.concatenate(points)
        self.labels = np.concatenate(labels)
        self.offsets = np.cumsum([0] + [len(p) for p in points])
        self.categories = np.asarray(categories, dtype=np.int64)

    def _checked_labels(self, path, labels, category):
        start, stop = self.part_ranges[category]
        bad = (labels != np.round(labels)) | (labels < start) | (labels >= stop)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{path}: line {row + 1}: label {labels[row]:g} is not a part of "
                             f"{self.category_names[category]} ({start}..{stop - 1})")
        return labels.astype(np.int16)

    def __len__(self):
        return len(self.categories)

    def __getitem__(self, index):
        start, stop = self.offsets[index], self.offsets[index + 1]
        points, labels = self.points[start:stop], self.labels[start:stop]
        rng = sample_rng(self.augment, self.seed, index)
        xyz = normalize_unit_sphere(points[:, :3])  # the whole shape's sphere, not the subset's
        choice = sample_indices(stop - start, self.num_points, rng)
        xyz, normals, labels = xyz[choice], points[choice, 3:6], labels[choice]
        if self.augment:
            xyz, normals = augment(xyz, normals, rng, **AUGMENT)
        return {"xyz": torch.from_numpy(xyz.astype(np.float32)),
                "feat": torch.from_numpy(normals.astype(np.float32)),
                "label": torch.from_numpy(labels.astype(np.int64)),
                "category": torch.tensor(self.categories[index])}
