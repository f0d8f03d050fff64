"""S3DIS in each of its forms, and the choice among them from a folder's contents
(`open_rooms`); the forms other repositories prepare are read as they are:

    raw release   Stanford3dDataset_v1.2_Aligned_Version/Area_N/<room>/Annotations/<class>_<k>.txt
                  (lib/data/s3dis.py; converted once into per-room arrays)
    N x 7 .npy    Area_N_<room>.npy, one array per room, columns x y z r g b label (float64),
                  as written by PointNet's collect_indoor3d_data.py (kept in yanx27's
                  Pointnet_Pointnet2_pytorch: data/stanford_indoor3d/), used as
                  trainval_fullarea/ by POSTECH's point-transformer and as s3disfull/raw/ by
                  PointNeXt; xyz shifted so that the room's minimum is the origin, colours
                  0..255, labels in the 13-class order of lib/data/s3dis.py
    Pointcept     Area_N/<room>/coord.npy (N, 3) float32, color.npy (N, 3) uint8,
                  segment.npy (N, 1) int16, and normal.npy / instance.npy which are not used
                  (Pointcept's preprocess_s3dis.py and its s3dis-compressed archive)
    converted     Area_N/<room>.npz (xyz, rgb, label), what `python -m lib.data.s3dis` writes
                  from the raw release (s3dis_npy/ beside it, or its --out folder): readable
                  as a data root of its own, without the raw release

Every form yields the same arrays per room, xyz (N, 3) float32, rgb (N, 3) uint8, label (N,)
uint8, so that crops, splits and metrics do not depend on the form. Each source has
`list_rooms(areas)` (names `Area_N/<room>`, sorted by area then room), `read_room(name)` and
`room_files(name)`, the files a room is read from (the raw release: its annotation files, the
source of the converted arrays), which a run lists (lib/data.file_listing).
"""
import os
import re
import sys
import zipfile

import numpy as np

from lib.data import IncompleteDataset, error_reason, first_bad_label, note, one_level_down
from lib.data.recognise import other_dataset_hint
from lib.data.s3dis import (AREAS, CLASS_NAMES, RAW_DIRNAME, annotation_files, areas_absent,
                            convert_room, default_processed_dir, find_raw_dir, list_rooms,
                            preprocess)

NPY_ROOM = re.compile(r"Area_(\d)_(.+)\.npy")
# the names yanx27's Pointnet_Pointnet2_pytorch, POSTECH's point-transformer and PointNeXt
# (data/S3DIS/s3disfull/raw/) give the folder
NPY_SUBFOLDERS = ("stanford_indoor3d", "trainval_fullarea", "raw")
POINTCEPT_FILES = ("coord.npy", "color.npy", "segment.npy")
# PointNet's S3DIS download for its sem_seg code: blocks, not rooms (named in the error, not read)
BLOCKS_FOLDER = "indoor3d_sem_seg_hdf5_data"
BLOCKS_FILE = re.compile(r"ply_data_all_\d+\.h5")
SUPPORTED = (f"the raw release ({RAW_DIRNAME}/Area_N/<room>/Annotations/), per-room N x 7 "
             f".npy (Area_N_<room>.npy, also inside "
             f"{', '.join(folder + '/' for folder in NPY_SUBFOLDERS)}), "
             f"Pointcept's Area_N/<room>/{{coord,color,segment}}.npy, or the rooms converted by "
             f"python -m lib.data.s3dis (Area_N/<room>.npz)")


def open_rooms(root, processed_dir=None, skip_malformed=False):
    """The room source for the S3DIS form found in `root`; prints which one it is."""
    root = str(root)
    source = find_source(root, processed_dir, skip_malformed)
    note(f"[s3dis] {root}: {source.layout}")
    return source


def find_form(root):
    """(the source class of the S3DIS form `root` holds, the folder it reads), or None; from
    the folders' names alone, no file read (lib/data/recognise.py asks it of any folder)."""
    if os.path.isdir(os.path.join(root, RAW_DIRNAME)):
        return RawRelease, root
    for folder in (root,) + tuple(os.path.join(root, f) for f in NPY_SUBFOLDERS):
        if os.path.isdir(folder) and any(NPY_ROOM.fullmatch(f) for f in os.listdir(folder)):
            return NpyRooms, folder
    if any_room_holds(root, "coord.npy"):
        return PointceptRooms, root
    if any_room_holds(root, "Annotations"):
        return RawRelease, root
    if any(f.endswith(".npz") for area_dir in area_dirs(root) for f in os.listdir(area_dir)):
        return ConvertedRooms, root
    return None


def find_source(root, processed_dir, skip_malformed):
    form = find_form(root)
    if form is not None:
        source, folder = form
        if source is RawRelease:
            return RawRelease(folder, processed_dir, skip_malformed)
        return source(folder)
    blocks = pointnet_blocks_folder(root)
    if blocks:
        raise FileNotFoundError(f"{blocks}: PointNet's {BLOCKS_FOLDER} (ply_data_all_*.h5: "
                                f"the rooms cut into 1 m blocks of 4096 resampled points) is not "
                                f"read: its blocks leave out and repeat points, so no room could "
                                f"be scored point by point as the Area 5 figures are; use the "
                                f"N x 7 .npy rooms the blocks were cut from (PointNet's "
                                f"collect_indoor3d_data.py writes them into stanford_indoor3d/) "
                                f"or the raw release; supported: {SUPPORTED}")
    if any(f.endswith(".pth") for area_dir in area_dirs(root) for f in os.listdir(area_dir)):
        raise FileNotFoundError(f"{root}: rooms as Area_N/<room>.pth (the form older versions of "
                                f"Pointcept's preprocess_s3dis.py wrote) are not read; its current "
                                f"version writes per-room .npy folders, which are; supported: "
                                f"{SUPPORTED}")
    inside = one_level_down(root, lambda folder: os.path.isdir(os.path.join(folder, RAW_DIRNAME))
                            or bool(area_dirs(str(folder)))
                            or any(NPY_ROOM.fullmatch(f) for f in os.listdir(folder)))
    # a subfolder of its own named, another dataset's layout would be beside the point
    hint = "" if inside else other_dataset_hint(root, "s3dis")
    raise FileNotFoundError(f"{root}: no S3DIS layout found{inside}; supported: {SUPPORTED}{hint}")


def pointnet_blocks_folder(root):
    """The folder holding PointNet's sem_seg blocks (ply_data_all_<k>.h5, all_files.txt,
    room_filelist.txt; DGCNN reads them too): `root`, its indoor3d_sem_seg_hdf5_data/ or its
    raw/ (where PyG's S3DIS dataset keeps them), or None."""
    for folder in (root, os.path.join(root, BLOCKS_FOLDER), os.path.join(root, "raw")):
        if os.path.isdir(folder) and any(BLOCKS_FILE.fullmatch(f) or f == "room_filelist.txt"
                                         for f in os.listdir(folder)):
            return folder
    return None


def read_processed_room(path):
    """xyz, rgb, label of a room converted by `preprocess`; a file that is not one (truncated
    by a copy, or another program's) is a one-line ValueError naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["xyz"], data["rgb"], data["label"]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a room converted by lib.data.s3dis "
                         f"({error_reason(err)})") from None


class RawRelease:
    """Rooms of the raw release, read through the per-room arrays `preprocess` writes once."""
    layout = f"raw release ({RAW_DIRNAME}/Area_N/<room>/Annotations/<class>_<k>.txt)"

    def __init__(self, root, processed_dir=None, skip_malformed=False):
        self.raw_dir = find_raw_dir(root)
        self.processed_dir = processed_dir or default_processed_dir(self.raw_dir)
        self.skip_malformed = skip_malformed

    def list_rooms(self, areas):
        preprocess(self.raw_dir, self.processed_dir, areas, self.skip_malformed)
        return list_rooms(self.raw_dir, areas)

    def room_files(self, name):
        return annotation_files(os.path.join(self.raw_dir, name))

    def read_room(self, name):
        path = os.path.join(self.processed_dir, name + ".npz")
        try:
            return read_processed_room(path)
        except ValueError as err:  # damaged after its conversion: the release can redo it
            note(f"[s3dis] {err}: converting the room again", file=sys.stderr)
            convert_room(os.path.join(self.raw_dir, name), path, self.skip_malformed)
            return read_processed_room(path)


def area_dirs(root):
    return [d for d in (os.path.join(root, f"Area_{a}") for a in AREAS) if os.path.isdir(d)]


def room_dirs(area_dir):
    """The room folders of an area; hidden ones (.ipynb_checkpoints, .DS_Store's kin) are not
    rooms."""
    return [os.path.join(area_dir, r) for r in sorted(os.listdir(area_dir))
            if os.path.isdir(os.path.join(area_dir, r)) and not r.startswith(".")]


def any_room_holds(root, name):
    """Whether some Area_N/<room>/ folder holds `name`: a form is told by any of its rooms, so
    that one incomplete room is reported by name rather than hiding the whole form."""
    return any(os.path.exists(os.path.join(room, name))
               for area_dir in area_dirs(root) for room in room_dirs(area_dir))


def load_array(path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({error_reason(err)})") from None


def checked_room(xyz, rgb, label, paths):
    """Validates one room's arrays; paths (of xyz, rgb, label) name the file in an error."""
    xyz_path, rgb_path, label_path = paths
    if not len(xyz):
        raise ValueError(f"{xyz_path}: the room has no points")
    if not np.isfinite(xyz).all():
        raise ValueError(f"{xyz_path}: point {int(np.argmin(np.isfinite(xyz).all(1)))}: NaN or "
                         f"infinite coordinates")
    bad_rgb = ~np.isfinite(rgb).all(1) | (rgb < 0).any(1) | (rgb > 255).any(1)
    if bad_rgb.any():
        raise ValueError(f"{rgb_path}: point {int(np.argmax(bad_rgb))}: colour outside 0..255")
    if 0 < rgb.max() <= 1:  # rounded to 0..255 integers below, such a room would read as black
        raise ValueError(f"{rgb_path}: every colour lies within 0..1 (largest {rgb.max():g}): "
                         f"colours are read on the release's 0..255 scale; multiply them by 255")
    i = first_bad_label(label, 0, len(CLASS_NAMES))
    if i is not None:
        raise ValueError(f"{label_path}: point {i}: label {label[i]:g} is not one of the "
                         f"{len(CLASS_NAMES)} S3DIS classes (0..{len(CLASS_NAMES) - 1})")
    return xyz.astype(np.float32), np.round(rgb).astype(np.uint8), label.astype(np.uint8)


def rooms_of_areas(names, areas, where):
    """names of the given areas, sorted by area then room; an area without rooms is an error
    (as a missing Area_N folder of the raw release is; s3dis.areas_absent)."""
    listed, absent = [], []
    for area in areas:
        rooms = sorted(n for n in names if n.startswith(f"Area_{area}/"))
        if not rooms:
            absent.append(f"{where}: no rooms of Area_{area}")
        listed += rooms
    if absent:
        raise areas_absent(absent[0], len(absent), len(areas))
    return listed


class NpyRooms:
    layout = "per-room N x 7 .npy (Area_N_<room>.npy: x y z r g b label)"

    def __init__(self, folder):
        self.folder = folder
        self.files = {f"Area_{m[1]}/{m[2]}": os.path.join(folder, m[0])
                      for m in map(NPY_ROOM.fullmatch, sorted(os.listdir(folder))) if m}

    def list_rooms(self, areas):
        return rooms_of_areas(self.files, areas, self.folder)

    def room_files(self, name):
        return [self.files[name]]

    def read_room(self, name):
        path = self.files[name]
        table = load_array(path)
        if table.ndim != 2 or table.shape[1] != 7:
            raise ValueError(f"{path}: expected an N x 7 array (x y z r g b label), found shape "
                             f"{table.shape}")
        return checked_room(table[:, :3], table[:, 3:6], table[:, 6], (path,) * 3)


class PointceptRooms:
    layout = "Pointcept (Area_N/<room>/{coord,color,segment}.npy)"

    def __init__(self, root):
        self.root = root

    def list_rooms(self, areas):
        names = []
        for area in areas:
            area_dir = os.path.join(self.root, f"Area_{area}")
            if not os.path.isdir(area_dir):
                continue
            for room in room_dirs(area_dir):  # every room: one left out would shrink a split
                missing = [f for f in POINTCEPT_FILES if not os.path.isfile(os.path.join(room, f))]
                if missing:
                    raise IncompleteDataset(f"{room}: no {', '.join(missing)} (a Pointcept room "
                                            f"holds {', '.join(POINTCEPT_FILES)})")
                names.append(f"Area_{area}/{os.path.basename(room)}")
        return rooms_of_areas(names, areas, self.root)

    def room_files(self, name):
        return [os.path.join(self.root, name, f) for f in POINTCEPT_FILES]

    def read_room(self, name):
        paths = self.room_files(name)
        for path in paths:
            if not os.path.isfile(path):
                raise IncompleteDataset(f"{path}: missing (a Pointcept room holds "
                                        f"{', '.join(POINTCEPT_FILES)})")
        xyz, rgb, label = (load_array(p) for p in paths)
        n = xyz.shape[0] if xyz.ndim else 0
        for path, array, width in zip(paths, (xyz, rgb, label), (3, 3, 1)):
            if array.shape != (n, width) and not (width == 1 and array.shape == (n,)):
                raise ValueError(f"{path}: expected shape ({n}, {width}) like coord.npy, found "
                                 f"{array.shape}")
        return checked_room(xyz, rgb, label.reshape(-1), paths)


class ConvertedRooms:
    """The per-room arrays `python -m lib.data.s3dis` converts the raw release into, read
    without the release (which the raw form needs, to list its rooms and keep them up to date)."""
    layout = "rooms converted by python -m lib.data.s3dis (Area_N/<room>.npz)"

    def __init__(self, root):
        self.root = root

    def list_rooms(self, areas):
        names = [f"{os.path.basename(area_dir)}/{f[:-len('.npz')]}"
                 for area_dir in area_dirs(self.root)
                 for f in sorted(os.listdir(area_dir)) if f.endswith(".npz")]
        return rooms_of_areas(names, areas, self.root)

    def room_files(self, name):
        return [os.path.join(self.root, name + ".npz")]

    def read_room(self, name):
        path, = self.room_files(name)
        return checked_room(*read_processed_room(path), (path,) * 3)
