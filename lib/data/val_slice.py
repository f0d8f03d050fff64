"""The validation protocol (--val-split): which data validates a run (it picks best.pt and feeds
HAQ's reward) and, with "trainval", what trains. Never the test split.

    auto         the dataset's val split; when none of its files is present (a partial
                 download), a fixed tenth of train instead, which training then leaves out
    train-slice  that tenth of train, whatever val files are present
    trainval     train on train + val (the protocol some papers use); validate on the val split
                 (or the tenth of train where no val file is present), which is then inside the
                 training data: report the last epoch's test score, not best.pt's

ShapeNet part ships a val list. ModelNet and S3DIS have none: their readers already hold out a
fixed tenth of train as "val" (lib/data/modelnet40.py, lib/data/s3dis.py), so for them "auto"
and "train-slice" are the same and "trainval" trains on the whole training split.
The training split returned carries `val_key`, what its validation split is (the protocol
and, for a slice of train, its size and seed: `held_out_key`, `val_list_key`, `slice_key`),
which the checkpoint records and a resumed run compares (lib/experiment.check_resumed_data),
and `val_source`, the same in words for people (`describe`), which may be reworded freely. What
the val split holds, shape by shape, a run records and compares too (`val_sha256`).
"""
import re

import numpy as np
import torch

from lib.data import build_dataset, note

VAL_SPLITS = ("auto", "train-slice", "trainval")
SLICE_EVERY = 10  # a tenth, like ModelNet's and S3DIS's own held-out slices
SLICE_SEED = 0  # fixed, not --seed: runs with different seeds validate on the same shapes
OWN_VAL_LIST = ("shapenet_part", "synthetic_parts")  # the datasets whose val split is a list


def held_out_key(in_training):
    """A reader's own held-out tenth of train (ModelNet, S3DIS); in_training: under trainval."""
    return {"val": "held_out_tenth", "in_training": in_training}


def val_list_key(in_training):
    """The dataset's val list; in_training: under trainval, where train + val train and the val
    split (or a tenth of train, where no val file is present) validates."""
    return {"val": "val_list_or_slice" if in_training else "val_list", "in_training": in_training}


def slice_key(samples, seed=SLICE_SEED, every=SLICE_EVERY):
    """`samples` samples of the training split, every-th of it drawn by seed, left out of it."""
    return {"val": "train_slice", "in_training": False, "every": every, "seed": seed,
            "samples": samples}


def describe(key):
    """val_key in words (the val_source a checkpoint records, for people)."""
    if key["val"] == "held_out_tenth":
        return "the dataset's held-out tenth of train" + (
            ", inside the training data (trainval)" if key["in_training"] else "")
    if key["val"] == "val_list_or_slice":
        return ("the val split (or a tenth of train where none is present), inside the training "
                "data (trainval)")
    if key["val"] == "val_list":
        return "the dataset's val split"
    return (f"a fixed tenth of the training split ({key['samples']} samples, seed "
            f"{key['seed']}), left out of training")


# The val_source sentences checkpoints recorded before val_key existed, and the key each one
# means (every tenth, as SLICE_EVERY was): frozen, so that those runs stay resumable however
# `describe` words the keys now.
SENTENCES_BEFORE_KEYS = {
    "the dataset's held-out tenth of train": held_out_key(False),
    "the dataset's held-out tenth of train, inside the training data (trainval)":
        held_out_key(True),
    "the val split (or a tenth of train where none is present), inside the training data "
    "(trainval)": val_list_key(True),
    "the dataset's val split": val_list_key(False),
}
SLICE_SENTENCE_BEFORE_KEYS = re.compile(
    r"a fixed tenth of the training split \((\d+) samples, seed (\d+)\), left out of training")


def recorded_val_key(data):
    """The val_key of a checkpoint's data record (dataset_meta's form); for one written before
    val_key existed, the key its val_source sentence means. None: it records neither, or words
    no version wrote."""
    if "val_key" in data:
        return data["val_key"]
    sentence = data.get("val_source")
    if sentence in SENTENCES_BEFORE_KEYS:
        return dict(SENTENCES_BEFORE_KEYS[sentence])
    match = SLICE_SENTENCE_BEFORE_KEYS.fullmatch(sentence or "")
    return slice_key(int(match[1]), int(match[2]), every=10) if match else None


def val_slice(n):
    """-> (val indices, train indices) into a training split of n samples, both sorted."""
    if n < 2:
        raise ValueError(f"the training split has {n} sample(s): too few to hold out a val slice")
    order = np.random.default_rng(SLICE_SEED).permutation(n)
    cut = max(1, n // SLICE_EVERY)
    return np.sort(order[:cut]), np.sort(order[cut:])


class SplitSlice(torch.utils.data.Dataset):
    """Some samples of a dataset, which keeps the dataset's other attributes (task, labels...)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]

    def __getattr__(self, name):
        if name.startswith("__") or name in ("dataset", "indices"):  # e.g. while unpickling
            raise AttributeError(name)
        return getattr(self.dataset, name)


def split_with_val_protocol(name, root, split, val_split, **kwargs):
    """build_dataset(name, root, split, **kwargs) under the protocol `val_split` (above)."""
    if val_split not in VAL_SPLITS:
        raise ValueError(f"unknown --val-split {val_split!r}; choose one of {', '.join(VAL_SPLITS)}")

    def read(part):
        return build_dataset(name, root, part, **kwargs)

    if split == "test":
        return read("test")
    if name not in OWN_VAL_LIST:
        if split == "val":
            return read("val")
        data = read("trainval" if val_split == "trainval" else "train")
        return with_val_key(data, held_out_key(val_split == "trainval"))
    sliced = val_split == "train-slice" or (val_split == "auto" and split == "train"
                                            and not val_present(read))
    if split == "val" and not sliced:
        try:
            return read("val")
        except FileNotFoundError as err:
            note(f"[data] {err}: validating on a fixed tenth of the training split instead")
            sliced = True
    if split == "val":
        train = read("train")
        return SplitSlice(train, val_slice(len(train))[0])
    if val_split == "trainval":
        return with_val_key(read("trainval"), val_list_key(True))
    train = read("train")
    if not sliced:
        return with_val_key(train, val_list_key(False))
    held_out, kept = val_slice(len(train))
    return with_val_key(SplitSlice(train, kept), slice_key(len(held_out)))


def val_sha256(val_set):
    """SHA-256 of the shapes or rooms the validation split `val_set` holds, names and contents
    (ShapeNet part's val list or its slice of train, ModelNet's and S3DIS's held-out tenth of
    train), or None for a split without `content_sha256`. val_key says what the split is, not
    which shapes: a val list edited, a partial download completed or a room re-converted
    between a run and its resume changed the split under the run's best-so-far metric, and
    best.pt was picked across two."""
    base, indices = ((val_set.dataset, val_set.indices) if isinstance(val_set, SplitSlice)
                     else (val_set, None))  # a slice forwards content_sha256 to the whole split
    return base.content_sha256(indices) if hasattr(base, "content_sha256") else None


def with_val_key(data, key):
    """The training split `data` marked with what validates it (val_key, val_source)."""
    data.val_key, data.val_source = key, describe(key)
    return data


def val_present(read):
    try:
        read("val")
    except FileNotFoundError as err:
        note(f"[data] {err}: training leaves a fixed tenth of the training split out to validate on")
        return False
    return True
