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
The training split returned carries `val_source`, a sentence the checkpoint records (and a
resumed run compares, lib/experiment.check_resumed_data: rewording one refuses old runs' resumes).
"""
import numpy as np
import torch

from lib.data import build_dataset, note

VAL_SPLITS = ("auto", "train-slice", "trainval")
SLICE_EVERY = 10  # a tenth, like ModelNet's and S3DIS's own held-out slices
SLICE_SEED = 0  # fixed, not --seed: runs with different seeds validate on the same shapes
OWN_VAL_LIST = ("shapenet_part", "synthetic_parts")  # the datasets whose val split is a list


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
        data.val_source = "the dataset's held-out tenth of train" + (
            ", inside the training data (trainval)" if val_split == "trainval" else "")
        return data
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
        data = read("trainval")
        data.val_source = ("the val split (or a tenth of train where none is present), inside "
                           "the training data (trainval)")
        return data
    train = read("train")
    if not sliced:
        train.val_source = "the dataset's val split"
        return train
    held_out, kept = val_slice(len(train))
    data = SplitSlice(train, kept)
    data.val_source = (f"a fixed tenth of the training split ({len(held_out)} samples, seed "
                       f"{SLICE_SEED}), left out of training")
    return data


def val_present(read):
    try:
        read("val")
    except FileNotFoundError as err:
        note(f"[data] {err}: training leaves a fixed tenth of the training split out to validate on")
        return False
    return True
