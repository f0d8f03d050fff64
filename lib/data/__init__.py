"""Datasets: `build_dataset(name, root, split, ...)`, `default_root(name)`, and the text-table
parser every reader of the released `.txt` formats shares.

Readers are imported inside `build_dataset`, so importing `lib.data` costs nothing and a reader
that needs an optional package only needs it when its dataset is used.
"""
import hashlib
import itertools
import json
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

DATASET_NAMES = ("shapenet_part", "s3dis", "modelnet40", "modelnet10",
                 "synthetic_parts", "synthetic_cls", "synthetic_rooms")
SPLITS = ("train", "val", "test")
# "trainval" (train + val, for protocols that train on both) is readable, not checked by default.
READABLE_SPLITS = SPLITS + ("trainval",)

# Where to get each dataset (data/README.md has the details and the sources' sources).
DOWNLOAD = {
    "shapenet_part": (
        "shapenetcore_partanno_segmentation_benchmark_v0_normal.zip (its old host "
        "shapenet.cs.stanford.edu is gone; see data/README.md for mirrors)",
        "synsetoffset2category.txt, train_test_split/shuffled_{train,val,test}_file_list.json "
        "and <synset>/<shape id>.txt (x y z nx ny nz label); or the v0 or hdf5 forms"),
    "modelnet40": (
        "modelnet40_normal_resampled.zip (huggingface.co/datasets/Pointcept/"
        "modelnet40_normal_resampled-compressed) or ModelNet40.zip (modelnet.cs.princeton.edu)",
        "modelnet40_shape_names.txt, modelnet40_{train,test}.txt and <class>/<class>_NNNN.txt "
        "(x,y,z,nx,ny,nz); or shape_names.txt, {train,test}_files.txt and ply_data_*.h5; or "
        "<class>/{train,test}/*.off"),
    "s3dis": (
        "Stanford3dDataset_v1.2_Aligned_Version.zip (http://buildingparser.stanford.edu/"
        "dataset.html) or Pointcept's huggingface.co/datasets/Pointcept/s3dis-compressed",
        "Area_N/<room>/Annotations/<class>_<k>.txt (x y z r g b), Area_N_<room>.npy, or "
        "Area_N/<room>/{coord,color,segment}.npy"),
}
DOWNLOAD["modelnet10"] = (
    "modelnet40_normal_resampled.zip (it ships the ModelNet10 lists) or ModelNet10.zip "
    "(modelnet.cs.princeton.edu)",
    "modelnet10_shape_names.txt, modelnet10_{train,test}.txt and <class>/<class>_NNNN.txt; or "
    "<class>/{train,test}/*.off")

# The folders each dataset is looked for in under data/, in order: the first present is used.
DEFAULT_FOLDERS = {
    "shapenet_part": ("shapenetcore_partanno_segmentation_benchmark_v0_normal",
                      "shapenet_part_seg_hdf5_data", "hdf5_data",
                      "shapenetcore_partanno_segmentation_benchmark_v0"),
    "modelnet40": ("modelnet40_normal_resampled", "modelnet40_ply_hdf5_2048", "ModelNet40"),
    "modelnet10": ("modelnet40_normal_resampled", "ModelNet10"),
    "s3dis": ("Stanford3dDataset_v1.2_Aligned_Version", "s3dis", "stanford_indoor3d",
              "trainval_fullarea"),
}


class IncompleteDataset(FileNotFoundError):
    """A file that the dataset's own lists or layout call for is missing beside others that are
    present: a damaged or partial copy, where a plain FileNotFoundError means the split (or the
    dataset) is not there at all. `python -m lib.data` fails on this one, not on that."""


def content_sha256(items):
    """SHA-256 of `items`, (name, *arrays) in order: which shapes or rooms a validation split
    holds, names and contents, as a run records it (lib/data/val_slice.val_sha256)."""
    digest = hashlib.sha256()
    for name, *arrays in items:
        digest.update(f"{name}\n".encode())
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_listing(dataset):
    """What a run records of its training split's files: [[path relative to the dataset's
    root, size in bytes(, samples)]] sorted by path, of the files its reader lists
    (`source_files()`: [(path, samples the file holds, or None for one)]), or None for a
    dataset without that list. Stat calls only, no file read: content-hashing S3DIS's training
    rooms would cost seconds at every start, so a file rewritten with the same size is not told
    apart (lib/DESIGN.md)."""
    if not hasattr(dataset, "source_files"):
        return None
    listing = []
    for path, samples in dataset.source_files():
        entry = [os.path.relpath(path, dataset.root), os.stat(path).st_size]
        listing.append(entry if samples is None else entry + [samples])
    return sorted(listing)


def listing_sha256(listing):
    """SHA-256 of a file_listing (None for None): the fingerprint a checkpoint records beside
    val_sha256."""
    return None if listing is None else hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def listing_changes(recorded, now):
    """What differs between two file_listings, in words: how many files differ (size or
    samples), were added or removed, and the first of them, e.g. "1 file differs of the 12
    recorded, e.g. a.txt now 52311 bytes (recorded 52000 bytes)"."""
    before, after = ({entry[0]: entry[1:] for entry in listing} for listing in (recorded, now))
    differ = sorted(path for path in before.keys() & after.keys() if before[path] != after[path])
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())

    def held(entry):
        return f"{entry[0]} bytes" + (f", {entry[1]} samples" if len(entry) > 1 else "")

    counts = [f"{len(paths)} file{'s' if len(paths) > 1 else ''} {verb}" for paths, verb in
              ((differ, "differ" if len(differ) > 1 else "differs"), (added, "added"),
               (removed, "removed")) if paths]
    if differ:
        example = f"{differ[0]} now {held(after[differ[0]])} (recorded {held(before[differ[0]])})"
    else:
        example = f"{(added or removed)[0]} {'added' if added else 'removed'}"
    return f"{', '.join(counts)} of the {len(before)} recorded, e.g. {example}"


def default_root(name):
    """The folder `name` is read from when no --data-root is given (under <repo>/data)."""
    if name in DEFAULT_FOLDERS:
        folders = [DATA_DIR / folder for folder in DEFAULT_FOLDERS[name]]
        return str(next((folder for folder in folders if folder.is_dir()), folders[0]))
    if name == "synthetic_parts":
        return str(SYNTHETIC_DIR / "parts")
    if name == "synthetic_cls":
        return str(SYNTHETIC_DIR / "cls" / "modelnet40_normal_resampled")
    if name == "synthetic_rooms":
        return str(SYNTHETIC_DIR / "rooms")  # the S3DIS reader finds the release folder inside
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def build_dataset(name, root=None, split="train", num_points=None, augment=False, seed=0,
                  samples_per_epoch=None, whole_rooms=False):
    """One split of a dataset as a torch Dataset of sample dicts (see the readers).

    num_points=None takes the dataset's usual size. Synthetic data missing at `root` is generated
    there first; a real dataset missing is a FileNotFoundError saying where to get it.
    samples_per_epoch: the length of an S3DIS training epoch, whose crops are drawn at random
    (None: the reader's default). whole_rooms: an S3DIS training split read for scoring, as
    val and test are (crops covering every point of every room, voted), not as random crops;
    the other datasets' splits are read whole anyway.
    """
    if split not in READABLE_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(READABLE_SPLITS)}")
    if samples_per_epoch is not None and (name not in ("s3dis", "synthetic_rooms")
                                          or split not in ("train", "trainval")):
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
    if name in ("modelnet40", "modelnet10", "synthetic_cls"):
        from lib.data.modelnet40 import ModelNet40Dataset
        return ModelNet40Dataset(root, variant=10 if name == "modelnet10" else 40, **kwargs)
    if name in ("s3dis", "synthetic_rooms"):
        from lib.data.s3dis import S3DISDataset
        return S3DISDataset(root, release=name == "s3dis", whole_rooms=whole_rooms, **kwargs)
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
    note(f"[data] {root} does not exist: generating {name} (seed {SYNTHETIC_SEED}) into {target}")
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


def read_text_file(path):
    """A list or name file's text; a byte that is not UTF-8 is a one-line error naming the file
    and the line (Path.read_text's own error names neither)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark (Notepad's) is dropped
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None


def one_level_down(root, holds):
    """'' or, for an error saying that `root` holds no form of a dataset, a clause naming the
    subfolder that does (`holds(folder)`) and the --data-root to give: PyG's datasets keep the
    release in <root>/raw/, and an archive unpacked into a folder of its own name nests it."""
    def holds_one(folder):
        try:
            return folder.is_dir() and not folder.name.startswith(".") and holds(folder)
        except OSError:  # a subfolder we may not list is not where the data is
            return False

    root = Path(root)
    found = [p for p in sorted(root.iterdir()) if holds_one(p)] if root.is_dir() else []
    if not found:
        return ""
    return (f", but its subfolder {found[0].name}/ does (as PyG keeps a release in raw/, or as an "
            f"archive unpacked into a folder of its own name nests it): give --data-root "
            f"{found[0]}")


def beside_or_cache(beside, cache_name, source):
    """Where a reader keeps what it derives from the dataset folder `source` (S3DIS's converted
    rooms, ModelNet's mesh samples): the folder `beside` it when that exists (made by whoever
    could write there) or can be made; else data/cache/<cache_name>-<its path's hash>, named
    after the path so that two read-only folders of one name (a lab's shared mounts) never
    share one."""
    if os.path.isdir(beside) or os.access(os.path.dirname(os.path.abspath(beside)), os.W_OK):
        return beside
    tag = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:8]
    return os.path.join(DATA_DIR, "cache", f"{cache_name}-{tag}")


# The remarks this process has printed (note): each is said once.
NOTES_PRINTED = set()


def note(*args, **kwargs):
    """print() for a reader's remark (a layout found, entries missing, a conversion), once per
    process and by the main process only: under torchrun every process reads the data and said
    it once each, and a training script reads the folder once per split (train, val, then test
    for the final score) and said the same remark about it each time."""
    text = kwargs.get("sep", " ").join(map(str, args))
    if os.environ.get("RANK", "0") == "0" and text not in NOTES_PRINTED:
        NOTES_PRINTED.add(text)
        print(*args, **kwargs)


def error_reason(error):
    """What a reader's error says, for a one-line message naming the file: its first line (numpy's
    and h5py's further lines advise), or its type where it says nothing."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def first_bad_label(labels, start, stop):
    """Index of the first label that is not an integer in [start, stop), or None."""
    bad = (labels != np.round(labels)) | (labels < start) | (labels >= stop)
    return int(np.argmax(bad)) if bad.any() else None


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
    with open(path, "rb") as f:  # decoded per line, so a byte that is not text is located too
        for number, raw in enumerate(itertools.islice(f, max_rows), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {number}: not UTF-8 text ({e})") from None
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
