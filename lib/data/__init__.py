"""Datasets: `build_dataset(name, root, split, ...)`, `default_root(name)`, and the text-table
parser every reader of the released `.txt` formats shares.

Readers are imported inside `build_dataset`, so importing `lib.data` costs nothing and a reader
that needs an optional package only needs it when its dataset is used.
"""
import itertools
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
SYNTHETIC_DIR = DATA_DIR / "synthetic"
# The synthetic data is part of the repository's definition, not of a run: one fixed seed.
SYNTHETIC_SEED = 0

DATASET_NAMES = ("shapenet_part", "s3dis", "modelnet40",
                 "synthetic_parts", "synthetic_cls", "synthetic_rooms")
SPLITS = ("train", "val", "test")

DOWNLOAD = {
    "shapenet_part": (
        "https://shapenet.cs.stanford.edu/media/"
        "shapenetcore_partanno_segmentation_benchmark_v0_normal.zip",
        "synsetoffset2category.txt, train_test_split/shuffled_{train,val,test}_file_list.json "
        "and <synset>/<shape id>.txt (x y z nx ny nz label)"),
    "modelnet40": (
        "https://shapenet.cs.stanford.edu/media/modelnet40_normal_resampled.zip "
        "(or modelnet40_ply_hdf5_2048.zip)",
        "modelnet40_shape_names.txt, modelnet40_{train,test}.txt and <class>/<class>_NNNN.txt "
        "(x,y,z,nx,ny,nz); or shape_names.txt, {train,test}_files.txt and ply_data_*.h5"),
    "s3dis": (
        "http://buildingparser.stanford.edu/dataset.html "
        "(Stanford3dDataset_v1.2_Aligned_Version.zip)",
        "Area_N/<room>/Annotations/<class>_<k>.txt (x y z r g b)"),
}


def default_root(name):
    """The folder `name` is read from when no --data-root is given (under <repo>/data)."""
    if name == "shapenet_part":
        return str(DATA_DIR / "shapenetcore_partanno_segmentation_benchmark_v0_normal")
    if name == "modelnet40":
        txt, h5 = DATA_DIR / "modelnet40_normal_resampled", DATA_DIR / "modelnet40_ply_hdf5_2048"
        return str(h5 if h5.is_dir() and not txt.is_dir() else txt)
    if name == "s3dis":
        return str(DATA_DIR / "Stanford3dDataset_v1.2_Aligned_Version")
    if name == "synthetic_parts":
        return str(SYNTHETIC_DIR / "parts")
    if name == "synthetic_cls":
        return str(SYNTHETIC_DIR / "cls" / "modelnet40_normal_resampled")
    if name == "synthetic_rooms":
        return str(SYNTHETIC_DIR / "rooms")  # the S3DIS reader finds the release folder inside
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def build_dataset(name, root=None, split="train", num_points=None, augment=False, seed=0,
                  samples_per_epoch=None):
    """One split of a dataset as a torch Dataset of sample dicts (see the readers).

    num_points=None takes the dataset's usual size. Synthetic data missing at `root` is generated
    there first; a real dataset missing is a FileNotFoundError saying where to get it.
    samples_per_epoch: the length of an S3DIS training epoch, whose crops are drawn at random
    (None: the reader's default).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if samples_per_epoch is not None and (name not in ("s3dis", "synthetic_rooms")
                                          or split != "train"):
        raise ValueError(f"--samples-per-epoch: only the S3DIS training split draws its samples "
                         f"at random ({name}, {split})")
    root = Path(root or default_root(name))
    if name.startswith("synthetic_"):
        _generate_if_missing(name, root)
    elif name in DOWNLOAD and not root.is_dir():
        url, layout = DOWNLOAD[name]
        raise FileNotFoundError(f"{root}: no {name} data here; download {url} and unpack it so "
                                f"that this folder holds {layout}")
    kwargs = dict(split=split, augment=augment, seed=seed)
    if num_points is not None:
        kwargs["num_points"] = num_points
    if samples_per_epoch is not None:
        kwargs["samples_per_epoch"] = samples_per_epoch
    if name in ("shapenet_part", "synthetic_parts"):
        from lib.data.shapenet_part import ShapeNetPartDataset
        return ShapeNetPartDataset(root, **kwargs)
    if name in ("modelnet40", "synthetic_cls"):
        from lib.data.modelnet40 import ModelNet40Dataset
        return ModelNet40Dataset(root, **kwargs)
    if name in ("s3dis", "synthetic_rooms"):
        from lib.data.s3dis import S3DISDataset
        return S3DISDataset(root, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _generate_if_missing(name, root):
    """Parts and rooms are generated into `root`; classes live at `root` = <family>/<layout>, and
    the family (both ModelNet layouts) is written into root's parent."""
    if root.is_dir():
        return
    from lib.data import synthetic
    target = root.parent if name == "synthetic_cls" else root
    writer = {"synthetic_parts": synthetic.write_parts, "synthetic_cls": synthetic.write_cls,
              "synthetic_rooms": synthetic.write_rooms}[name]
    print(f"[data] {root} does not exist: generating {name} (seed {SYNTHETIC_SEED}) into {target}")
    write_atomically(target, lambda out: writer(out, seed=SYNTHETIC_SEED))
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the {name} generator did not write this folder")


def write_atomically(target, write, overwrite=False):
    """write(tmp) fills a temporary sibling folder, which then becomes `target` in one rename, so
    a reader (or a second DDP rank generating the same data) never sees a half-written folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = write(tmp)
        if overwrite and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same data first; its copy is identical (same seed).
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def read_point_table(path, num_columns, delimiter=None, max_rows=None):
    """A text file of `num_columns` numbers per line -> float32 (rows, num_columns).

    numpy's C loadtxt parses the common, well-formed file fast; only when it fails (or yields a
    NaN/inf) is the file scanned line by line, to name the first bad line in the error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": an error just below
            table = np.loadtxt(path, dtype=np.float32, delimiter=delimiter, comments=None,
                               ndmin=2, max_rows=max_rows)
    except ValueError:
        table = None
    if table is not None and len(table) == 0:
        raise ValueError(f"{path}: the file holds no points")
    if table is not None and table.shape[1] == num_columns and np.isfinite(table).all():
        return table
    _raise_first_bad_line(path, num_columns, delimiter, max_rows)
    # loadtxt refused the file for a reason the line scan does not single out
    raise ValueError(f"{path}: expected {num_columns} numeric columns per line")


def _raise_first_bad_line(path, num_columns, delimiter, max_rows):
    with open(path) as f:
        for number, line in enumerate(itertools.islice(f, max_rows), start=1):
            if not line.strip():
                continue  # loadtxt skips blank lines too
            fields = line.split(delimiter)
            if len(fields) != num_columns:
                raise ValueError(f"{path}: line {number}: expected {num_columns} columns, "
                                 f"found {len(fields)}")
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise ValueError(f"{path}: line {number}: not a number in "
                                 f"{line.strip()!r}") from None
            if not np.isfinite(values).all():
                raise ValueError(f"{path}: line {number}: NaN or infinite in {line.strip()!r}")
