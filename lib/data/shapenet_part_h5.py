"""ShapeNet part's hdf5 release (shapenet_part_seg_hdf5_data: PointNet's part_seg, DGCNN and the
PCT family train on it), read as released:

    all_object_categories.txt              `Name<TAB>synset` per category; `label` indexes it
    {train,val,test}_hdf5_file_list.txt    h5 file names, one a line
    ply_data_{train,val,test}<k>.h5        data (S, 2048, 3) float32; label (S, 1) uint8, the
                                           category; pid (S, 2048) uint8, the global part id
                                           0..49 (the ids of v0_normal's label column)

The zip unpacks as hdf5_data/, which DGCNN renames shapenet_part_seg_hdf5_data: the folder or its
parent may be given. Without a list file, a split is its ply_data_<split>*.h5 files.
"""
from pathlib import Path

import numpy as np

from lib.data import error_reason, first_bad_label, note, read_text_file

CATEGORY_FILE = "all_object_categories.txt"


def find_h5_folder(root):
    """The folder holding the release's files (root or root/hdf5_data), or None."""
    for folder in (Path(root), Path(root) / "hdf5_data"):
        if ((folder / CATEGORY_FILE).is_file() or any(folder.glob("*_hdf5_file_list.txt"))
                or bare_h5_files(folder)):
            return folder
    return None


def bare_h5_files(folder):
    """Whether `folder` holds ply_data_*.h5 files without the release's lists (then read as
    its h5 form, the missing list named), unless they are another release's of that name:
    ModelNet40's modelnet40_ply_hdf5_2048 (beside its shape_names.txt) or PointNet's S3DIS
    blocks (ply_data_all_*.h5), which the other readers, or their hints, take."""
    names = [path.name for path in folder.glob("ply_data_*.h5")]
    return (bool(names) and not (folder / "shape_names.txt").is_file()
            and not all(name.startswith("ply_data_all_") for name in names))


def split_files(folder, split):
    """-> the split's h5 paths (present or not), in list order."""
    paths = []
    for part in (("train", "val") if split == "trainval" else (split,)):
        list_file = folder / f"{part}_hdf5_file_list.txt"
        if list_file.is_file():
            names = [line.strip() for line in read_text_file(list_file).splitlines()
                     if line.strip()]
            paths += [folder / Path(name).name for name in names]  # lists may hold paths
        else:
            paths += sorted(folder.glob(f"ply_data_{part}*.h5"))
    return paths


def read_h5(path):
    """-> data (S, N, 3), label (S,), pid (S, N) of one file, shapes checked."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            data, label, pid = f["data"][:], f["label"][:], f["pid"][:]
    except (OSError, KeyError, TypeError) as err:  # TypeError: one of them a group
        raise ValueError(f"{path}: not a readable h5 file with data, label and pid "
                         f"({error_reason(err)})") from None
    label = label.reshape(-1)
    if data.ndim != 3 or data.shape[2] != 3 or len(label) != len(data) \
            or pid.shape != data.shape[:2]:
        raise ValueError(f"{path}: expected data (S, N, 3), label (S, 1) and pid (S, N), got "
                         f"{data.shape}, {label.shape} and {pid.shape}")
    return data, label, pid


def read_h5_split(folder, split, category_names, part_ranges):
    """-> [(category, points (N, 3) float32, part ids (N,) int16, "<file>:<index>")] of the
    split's files that are present; the missing ones are counted in one line."""
    paths = split_files(folder, split)
    shapes, present = [], 0
    for path in paths:
        if not path.is_file():
            continue
        present += 1
        data, label, pid = read_h5(path)
        finite = np.isfinite(data).all(axis=(1, 2))
        bad_category = first_bad_label(label, 0, len(category_names))  # 15.5 is not 15
        for i in range(len(data)):
            if not finite[i]:
                raise ValueError(f"{path}: shape {i}: NaN or infinite coordinates")
            if i == bad_category:
                raise ValueError(f"{path}: shape {i}: category {label[i]:g} is not an integer in "
                                 f"0..{len(category_names) - 1} ({CATEGORY_FILE})")
            category = int(label[i])
            start, stop = part_ranges[category]
            j = first_bad_label(pid[i], start, stop)
            if j is not None:
                raise ValueError(f"{path}: shape {i}, point {j}: part id {pid[i][j]} is not a "
                                 f"part of {category_names[category]} ({start}..{stop - 1})")
            shapes.append((category, data[i].astype(np.float32), pid[i].astype(np.int16),
                           f"{path.name}:{i}"))
    if not shapes:
        raise FileNotFoundError(f"{folder}: none of the {len(paths)} h5 files of the {split} "
                                f"split is present")
    if present < len(paths):
        note(f"[shapenet_part] {folder}: {len(paths) - present} of {len(paths)} h5 files of the "
              f"{split} split are missing; using the {present} present")
    return shapes
