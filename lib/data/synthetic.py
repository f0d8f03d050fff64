"""Procedural point clouds written in the released layouts, so the embedded default is read by
the very readers real data goes through:

    parts/   ShapeNet part layout: 6 categories of 2-4 labelled parts, with train/val/test
             lists and a part_ranges.json naming the parts (made-up 8-digit synsets)
    cls/     ModelNet40 in both layouts (modelnet40_normal_resampled/, modelnet40_ply_hdf5_2048/),
             10 classes: the 6 part categories as whole objects plus bottle, guitar, stool, vase
    rooms/   S3DIS layout, written by lib.data.synthetic_rooms
    and on request (--only) the other released forms: parts_v0/, parts_hdf5/, cls_off/,
    rooms_npy/, rooms_pointcept/ (lib/data/synthetic_layouts.py)

The shapes come from lib/data/synthetic_shapes.py (parts made of area-uniformly sampled
surfaces, random proportions, pose and noise). Part sizes vary enough that predicting a
category's most frequent part everywhere scores far below a trained model; the writer prints
that baseline. Every shape depends only on (seed, family, category, index): same seed, same
bytes.

    python -m lib.data.synthetic --out data/synthetic --seed 0
"""
import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lib.data import SYNTHETIC_DIR, note, synthetic_layouts, write_atomically
from lib.data.synthetic_shapes import CLASSES, PART_CATEGORIES, sample_shape

PART_POINTS = (2400, 2800)  # points per ShapeNet-layout file, like the release's ~2.7k
CLS_POINTS = 2048           # the h5 layout's size; the txt files get the same points + normals


def shape_rng(seed, family, category, index):
    """One stream per shape: changing the split sizes leaves the other shapes as they are."""
    return np.random.default_rng([seed, family, category, index])


def format_rows(table, sep):
    """The releases' `%.6f` text, formatted in one go (about twice as fast as np.savetxt)."""
    return ((sep.join(["%.6f"] * table.shape[1]) + "\n") * len(table)) % tuple(table.ravel())


def write_parts(out_dir, seed=0, train_shapes=96, eval_shapes=20):
    """ShapeNet part layout in out_dir: train_shapes + 2 * eval_shapes (val, test) shapes per
    category. Returns the trivial baseline's metrics on the test split (also printed)."""
    out = Path(out_dir)
    lists = {"train": [], "val": [], "test": []}
    ranges, category_lines, majority_parts, test_labels, start = {}, [], [], [], 0
    plan = ["train"] * train_shapes + ["val"] * eval_shapes + ["test"] * eval_shapes
    for c, (name, (part_names, generate)) in enumerate(PART_CATEGORIES.items()):
        synset = str(90000001 + c)
        (out / synset).mkdir(parents=True)
        category_lines.append(f"{name}\t{synset}\n")
        ranges[name] = {"range": [start, start + len(part_names)], "parts": part_names}
        train_counts = np.zeros(len(part_names))
        for k, split in enumerate(plan):
            rng = shape_rng(seed, 0, c, k)
            xyz, normals, labels = sample_shape(rng, generate(rng),
                                                int(rng.integers(*PART_POINTS, endpoint=True)))
            shape_id = hashlib.md5(f"{seed}/{name}/{k}".encode()).hexdigest()
            table = np.column_stack([xyz, normals, labels + start])
            (out / synset / f"{shape_id}.txt").write_text(format_rows(table, " "))
            lists[split].append(f"shape_data/{synset}/{shape_id}")
            if split == "train":
                train_counts += np.bincount(labels, minlength=len(part_names))
            elif split == "test":
                test_labels.append((c, labels + start))
        majority_parts.append(start + int(train_counts.argmax()))
        start += len(part_names)
    (out / "synsetoffset2category.txt").write_text("".join(category_lines))
    (out / "part_ranges.json").write_text(json.dumps(ranges, indent=1))
    (out / "train_test_split").mkdir()
    shuffle = np.random.default_rng([seed, 0, len(PART_CATEGORIES)])
    for split, entries in lists.items():
        entries = [entries[i] for i in shuffle.permutation(len(entries))]  # as the release's
        list_file = out / "train_test_split" / f"shuffled_{split}_file_list.json"
        list_file.write_text(json.dumps(entries))
    if not test_labels:
        return None
    result = majority_baseline(test_labels, majority_parts,
                               [tuple(r["range"]) for r in ranges.values()], list(ranges))
    note(f"[synthetic] trivial baseline (each category's most frequent training part for every "
          f"point) on the test split: instance mIoU {result['ins_miou']:.3f}, "
          f"class mIoU {result['cat_miou']:.3f}")
    return result


def majority_baseline(test_labels, majority_parts, part_ranges, category_names):
    """ShapeNet-protocol metrics of predicting majority_parts[category] for every point."""
    from lib.metrics import PartSegMetric
    metric = PartSegMetric(part_ranges, category_names)
    for category, labels in test_labels:
        logits = torch.zeros(1, len(labels), part_ranges[-1][1])  # (1, N, P)
        logits[..., majority_parts[category]] = 1
        metric.update(logits, torch.from_numpy(labels)[None], torch.tensor([category]))
    return metric.compute()


def write_cls(out_dir, seed=0, train_shapes=80, eval_shapes=20):
    """Both ModelNet40 layouts in out_dir from the same shapes: train_shapes + eval_shapes (test)
    per class; CLS_POINTS points each (the real txt files have 10,000)."""
    out = Path(out_dir)
    txt, h5_dir = out / "modelnet40_normal_resampled", out / "modelnet40_ply_hdf5_2048"
    lists, clouds = {"train": [], "test": []}, {"train": [], "test": []}
    for c, (name, generate) in enumerate(CLASSES.items()):
        (txt / name).mkdir(parents=True)
        for k in range(train_shapes + eval_shapes):
            split = "train" if k < train_shapes else "test"
            rng = shape_rng(seed, 1, c, k)
            xyz, normals, _ = sample_shape(rng, generate(rng), CLS_POINTS)
            entry = f"{name}_{k + 1:04d}"
            table = np.column_stack([xyz, normals])
            (txt / name / f"{entry}.txt").write_text(format_rows(table, ","))
            lists[split].append(entry)
            clouds[split].append((xyz.astype(np.float32), c))
    names = "".join(f"{name}\n" for name in CLASSES)
    (txt / "modelnet40_shape_names.txt").write_text(names)
    h5_dir.mkdir()
    (h5_dir / "shape_names.txt").write_text(names)
    for s, (split, entries) in enumerate(lists.items()):
        (txt / f"modelnet40_{split}.txt").write_text("".join(f"{e}\n" for e in entries))
        write_h5(h5_dir, split, clouds[split], np.random.default_rng([seed, 1, len(CLASSES), s]))


def write_h5(h5_dir, split, clouds, rng):
    """One ply_data_<split>0.h5 with the shapes in random order, as the release's are."""
    import h5py
    order = rng.permutation(len(clouds))
    with h5py.File(h5_dir / f"ply_data_{split}0.h5", "w") as f:
        f.create_dataset("data", data=np.stack([clouds[i][0] for i in order]))
        f.create_dataset("label", data=np.array([[clouds[i][1]] for i in order], dtype=np.uint8))
    # The release lists paths relative to its parent folder; readers resolve them by basename.
    (h5_dir / f"{split}_files.txt").write_text(
        f"data/modelnet40_ply_hdf5_2048/ply_data_{split}0.h5\n")


def write_rooms(out_dir, seed=0):
    """S3DIS layout, by the rooms generator (lib.data.synthetic_rooms), when it is available."""
    try:
        from lib.data.synthetic_rooms import write_rooms as write_room_layout
    except ImportError as err:
        note(f"[synthetic] rooms skipped: the S3DIS-layout writer is unavailable ({err})")
        return None
    return write_room_layout(out_dir, seed=seed)


def converted(write_source, convert, layout):
    """A writer of another form of a family: the source form into a scratch folder, converted
    into out_dir (lib/data/synthetic_layouts.py), the scratch removed."""
    def write(out_dir, seed=0, **sizes):
        scratch = Path(out_dir) / "_source"
        write_source(scratch, seed=seed, **sizes)
        convert(scratch, out_dir, layout)
        shutil.rmtree(scratch)
    return write


WRITERS = {"parts": write_parts, "cls": write_cls, "rooms": write_rooms}
# The other released forms, written on request only (tests, checking a reader by hand).
LAYOUT_WRITERS = {
    "parts_v0": converted(write_parts, synthetic_layouts.parts_as, "v0"),
    "parts_hdf5": converted(write_parts, synthetic_layouts.parts_as, "hdf5"),
    "cls_off": synthetic_layouts.write_cls_off,
    "rooms_npy": converted(write_rooms, synthetic_layouts.rooms_as, "npy"),
    "rooms_pointcept": converted(write_rooms, synthetic_layouts.rooms_as, "pointcept"),
}


def get_args_parser():
    p = argparse.ArgumentParser(description="Write the synthetic datasets in the real layouts.")
    p.add_argument("--out", default=str(SYNTHETIC_DIR),
                   help="folder that receives parts/, cls/ and rooms/ (replaced if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=list(WRITERS) + list(LAYOUT_WRITERS),
                   default=list(WRITERS),
                   help="families to write (default: the three the datasets read); parts_v0, "
                        "parts_hdf5, cls_off, rooms_npy, rooms_pointcept write the other "
                        "released forms")
    p.add_argument("--train-shapes", type=int, default=None,
                   help="training shapes per part category / class (default 96 / 80)")
    p.add_argument("--eval-shapes", type=int, default=None,
                   help="val and test shapes per part category, test shapes per class (default 20)")
    return p


def main(args):
    sizes = {k: v for k, v in (("train_shapes", args.train_shapes),
                               ("eval_shapes", args.eval_shapes)) if v is not None}
    for family in args.only:
        start, target = time.perf_counter(), Path(args.out) / family
        kwargs = dict(seed=args.seed, **(sizes if not family.startswith("rooms") else {}))
        writer = {**WRITERS, **LAYOUT_WRITERS}[family]
        write_atomically(target, lambda out: writer(out, **kwargs), overwrite=True)
        note(f"[synthetic] {family}: written to {target} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
