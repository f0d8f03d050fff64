"""S3DIS semantic segmentation (13 classes): reader for the raw release, one-time conversion to
arrays, training crops, and test crops that cover every original point, with voting.

Raw layout (as released): <root>/Stanford3dDataset_v1.2_Aligned_Version/Area_N/<room>/
Annotations/<class>_<k>.txt, one object instance per file, lines `x y z r g b`.
Processed (written once, redone when a room's annotation files are newer):
<parent of the raw folder>/s3dis_npy/Area_N/<room>.npz (s3dis_npy-<raw folder name>/ for a raw
folder named neither as the aligned release nor as data/ names it) with xyz (N, 3) float32
(coordinates as released), rgb (N, 3) uint8, label (N,) uint8; points in the order of the
annotation files sorted by name. "Original points" below means these N points.

Forms already prepared by other repositories (per-room N x 7 .npy, Pointcept's per-room folders)
are read as they are by lib/data/s3dis_forms.py, which also tells the forms apart.

Splits: "test" = Area 5; "train" / "val" = Areas 1, 2, 3, 4, 6, with every tenth room (sorted by
area, then name; the first included) held out as "val"; "trainval" = all rooms of those areas.

A sample is a kNN crop of `num_points` points (default 4096, CPU-sized; the paper feeds 80k)
from one pass of 4 cm grid subsampling (lib/data/grid.py). Training draws a random room
(weighted by its number of 4 cm cells, so every region is equally likely), a random point per
cell and a random centre. Val and test enumerate deterministic crops that together contain
every original point; each carries "room" and "index" so that RoomVoter can vote per point.
Inputs: xyz = crop coordinates with x, y centred on the crop and z measured from the room's
floor (lowest point); feat = rgb / 255 and the point's position normalised to the room's
bounding box, [0, 1]^3 (PointNet's S3DIS input; it tells a crop where it sits in the room).
"""
import argparse
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from lib import distributed
from lib.data import (DEFAULT_FOLDERS, IncompleteDataset, beside_or_cache, content_sha256, note,
                      read_point_table)
from lib.data.grid import covering_crops, cycling_pass, grid_cells, knn_crop, pad_by_resampling, random_pass
from lib.data.transforms import jitter, random_scale, sample_rng

RAW_DIRNAME = "Stanford3dDataset_v1.2_Aligned_Version"
PROCESSED_DIRNAME = "s3dis_npy"
CLASS_NAMES = ("ceiling", "floor", "wall", "beam", "column", "window", "door",
               "table", "chair", "sofa", "bookcase", "board", "clutter")
# A few released rooms annotate stairs; the 13-class benchmark counts them as clutter
# (as PointNet's collect_indoor3d_data does).
CLASS_ALIASES = {"stairs": "clutter"}
AREAS = (1, 2, 3, 4, 5, 6)
TEST_AREA = 5
# Rooms per area in the release (272 in all): a prepared copy with fewer is reported, since
# PointNet's collect_indoor3d_data.py, which made the N x 7 forms, skips a room it cannot parse
# with no more than a printed "ERROR!!": Area_5/hallway_6, at its malformed line (below).
RELEASE_ROOMS = {1: 44, 2: 40, 3: 23, 4: 49, 5: 68, 6: 48}
VAL_EVERY = 10
GRID_SIZE = 0.04  # metres, the Point Transformer's S3DIS grid
DEFAULT_NUM_POINTS = 4096
ANNOTATION_NAME = re.compile(r"([A-Za-z]+)_(\d+)\.txt")
MALFORMED_HINT = "rerun `python -m lib.data.s3dis --root ROOT --skip-malformed` to drop such lines"


# ---------------------------------------------------------------- reading the raw release

def bad_values(rows):
    """(n, 6) x y z r g b -> (n,) bool: a non-finite value or a colour outside 0..255."""
    return ~np.isfinite(rows).all(1) | (rows[:, 3:] < 0).any(1) | (rows[:, 3:] > 255).any(1)


def well_formed_lines(path):
    """Slow line-by-line parse for files the fast one rejects: (rows (n, 6) float32 of the
    lines holding six good numbers, numbers of the other non-blank lines)."""
    rows, line_numbers, malformed = [], [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                values = []
            if len(values) == 6:
                rows.append(values)
                line_numbers.append(number)
            else:
                malformed.append(number)
    rows = np.array(rows, dtype=np.float32).reshape(-1, 6)
    bad = bad_values(rows)
    return rows[~bad], sorted(malformed + [line_numbers[i] for i in np.flatnonzero(bad)])


def read_annotation(path, skip_malformed=False):
    """(n, 6) float32 rows `x y z r g b` of one annotation file. A malformed line is an error
    naming the file and line, or with skip_malformed is dropped and reported."""
    try:
        rows = read_point_table(path, 6)
        if not bad_values(rows).any():
            return rows
    except UnicodeDecodeError as e:
        if not skip_malformed:
            raise ValueError(f"{path}: {e}; {MALFORMED_HINT}") from None
    except ValueError as e:  # read_point_table's message names the file and line
        if not skip_malformed:
            raise ValueError(f"{e}; {MALFORMED_HINT}") from None
    rows, malformed = well_formed_lines(path)
    if malformed and not skip_malformed:  # the fast parse passed: a colour is out of range
        raise ValueError(f"{path}: line {malformed[0]}: colour outside 0..255; {MALFORMED_HINT}")
    if malformed:
        shown = ", ".join(map(str, malformed[:10])) + (", ..." if len(malformed) > 10 else "")
        note(f"[s3dis] {path}: dropped {len(malformed)} malformed line(s): {shown}", file=sys.stderr)
    return rows


def annotation_class(path):
    """Class index from an annotation file name `<class>_<k>.txt`."""
    name = ANNOTATION_NAME.fullmatch(os.path.basename(path)).group(1)
    name = CLASS_ALIASES.get(name, name)
    if name not in CLASS_NAMES:
        raise ValueError(f"{path}: unknown class {name!r}; expected one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name)


def annotation_files(room_dir):
    """The room's `<class>_<k>.txt` files, sorted by name. Other .txt files are left out: the
    release holds one, a duplicate `Area_5/office_36/Annotations/wall_3 (1).txt`."""
    ann_dir = os.path.join(room_dir, "Annotations")
    if not os.path.isdir(ann_dir):
        raise IncompleteDataset(f"{room_dir}: no Annotations folder")
    files = sorted(f for f in os.listdir(ann_dir) if ANNOTATION_NAME.fullmatch(f))
    if not files:
        raise ValueError(f"{ann_dir}: no <class>_<k>.txt annotation files")
    return [os.path.join(ann_dir, f) for f in files]


def read_room(room_dir, skip_malformed=False):
    """xyz (N, 3) float32, rgb (N, 3) uint8, label (N,) uint8 of a raw room folder. Files are
    narrowed to these types one at a time, so the peak memory is about twice the 16 bytes per
    point kept (plus one file's text parse), which matters for the multi-million-point rooms."""
    xyz, rgb, label = [], [], []
    for path in annotation_files(room_dir):
        rows = read_annotation(path, skip_malformed)  # (n, 6) float32
        xyz.append(rows[:, :3].copy())
        rgb.append(np.round(rows[:, 3:]).astype(np.uint8))
        label.append(np.full(len(rows), annotation_class(path), dtype=np.uint8))
    if not sum(map(len, label)):
        raise ValueError(f"{room_dir}: the room has no points")
    return np.concatenate(xyz), np.concatenate(rgb), np.concatenate(label)


# ---------------------------------------------------------------- preprocessing

def find_raw_dir(root):
    """The release folder: `root` itself when it holds Area_N folders, else root/RAW_DIRNAME."""
    if any(os.path.isdir(os.path.join(root, f"Area_{a}")) for a in AREAS):
        return root
    raw_dir = os.path.join(root, RAW_DIRNAME)
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"{root}: neither {RAW_DIRNAME}/ nor Area_N/ folders found")
    return raw_dir


def default_processed_dir(raw_dir):
    """s3dis_npy/ beside the raw release (a folder named as the aligned release, or as data/
    names it, e.g. s3dis/), or s3dis_npy-<its folder name>/ beside a release folder named
    otherwise (Stanford's unaligned Stanford3dDataset_v1.2 unpacks beside the aligned one;
    sharing one folder, the second read the first's rooms, whose files are newer than the
    archive's); under data/cache/ where that folder is read-only (a lab's shared dataset mount)
    and holds no converted rooms yet, named after the release's path so that two releases never
    share one."""
    parent, name = os.path.split(os.path.abspath(raw_dir))
    beside = os.path.join(parent, PROCESSED_DIRNAME if name in DEFAULT_FOLDERS["s3dis"]
                          else f"{PROCESSED_DIRNAME}-{name}")
    return beside_or_cache(beside, PROCESSED_DIRNAME, raw_dir)


def list_rooms(raw_dir, areas):
    """Room names `Area_N/<room>` of the given areas, sorted by area then room name."""
    names, absent = [], []
    for area in areas:
        area_dir = os.path.join(raw_dir, f"Area_{area}")
        if not os.path.isdir(area_dir):
            absent.append(f"{area_dir}: missing")
            continue
        rooms = [f"Area_{area}/{room}" for room in sorted(os.listdir(area_dir))
                 if os.path.isdir(os.path.join(area_dir, room)) and not room.startswith(".")]
        if not rooms:  # as s3dis_forms.rooms_of_areas says of a converted folder
            absent.append(f"{area_dir}: no rooms")
        names += rooms
    if absent:
        raise areas_absent(absent[0], len(absent), len(areas))
    return names


def areas_absent(first, absent, wanted):
    """The error for `absent` of a split's `wanted` areas holding no rooms (`first`: the first
    one's folder and what is wrong with it). With another area of the split there, the copy is
    damaged or partial, an IncompleteDataset, which `python -m lib.data` fails on (as a plain
    FileNotFoundError its train and val splits failed while it exited 0); with none, the split
    is absent (a folder holding Area 5 alone, to score on)."""
    kind = IncompleteDataset if absent < wanted else FileNotFoundError
    return kind(f"{first} (S3DIS areas {AREAS} are expected)")


def up_to_date(out_path, room_dir):
    if not os.path.exists(out_path):
        return False
    ann_dir = os.path.join(room_dir, "Annotations")  # its mtime changes when files come or go
    newest = max(os.path.getmtime(p) for p in [ann_dir] + annotation_files(room_dir))
    return os.path.getmtime(out_path) >= newest


def convert_room(room_dir, out_path, skip_malformed):
    xyz, rgb, label = read_room(room_dir, skip_malformed)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"  # per process: DDP ranks may convert the same room at once
    with open(tmp, "wb") as f:
        np.savez(f, xyz=xyz, rgb=rgb, label=label)
    os.replace(tmp, out_path)  # atomic: an interrupted run leaves no half-written room


def preprocess(raw_dir, out_dir, areas=AREAS, skip_malformed=False, workers=1):
    """Converts every room of `areas` whose arrays are missing or older than its annotation
    files. Returns the names of the rooms converted (empty when everything is up to date)."""
    names = list_rooms(raw_dir, areas)
    todo = [(os.path.join(raw_dir, name), os.path.join(out_dir, name + ".npz")) for name in names]
    todo = [(room_dir, out_path) for room_dir, out_path in todo if not up_to_date(out_path, room_dir)]
    if todo:
        note(f"[s3dis] converting {len(todo)} room(s) into {out_dir}", file=sys.stderr)
    room_dirs, out_paths = [t[0] for t in todo], [t[1] for t in todo]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(convert_room, room_dirs, out_paths, [skip_malformed] * len(todo)))
    else:
        for room_dir, out_path in todo:
            convert_room(room_dir, out_path, skip_malformed)
    return [os.path.relpath(room_dir, raw_dir) for room_dir in room_dirs]


# ---------------------------------------------------------------- dataset

class Room:
    """One room in memory, its points sorted by 4 cm grid cell (lib/data/grid.py).
    arrays: xyz (N, 3) float32, rgb (N, 3) uint8, label (N,) uint8."""

    def __init__(self, arrays, rng=None):
        xyz, rgb, label = arrays
        order, self.starts, self.counts = grid_cells(xyz, GRID_SIZE, rng)
        self.order = order.astype(np.int32)  # (N,) original index of each sorted point; rooms < 2^31 points
        self.xyz, self.rgb, self.label = xyz[order], rgb[order], label[order]
        self.lo = xyz.min(0)
        self.extent = np.maximum(xyz.max(0) - self.lo, 1e-6)

    def original_labels(self):
        return self.in_file_order(self.label)

    def in_file_order(self, sorted_values):
        values = np.empty_like(sorted_values)
        values[self.order] = sorted_values
        return values


def augment_crop(xyz, rgb, rng):
    """Training augmentation, a simplified form of the Point Transformer / Pointcept S3DIS
    recipe: rotation about z by a uniform angle, scale in [0.9, 1.1] per axis, jitter
    N(0, 0.005 m) clipped at 0.02 m, colour jitter N(0, 0.05), and with probability 0.2 the
    colour dropped to black (so that geometry alone must do). xyz (N, 3), rgb (N, 3) in [0, 1]."""
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    xyz = xyz @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=np.float32).T
    xyz, _ = random_scale(xyz, None, rng, 0.9, 1.1)
    xyz = jitter(xyz, rng, 0.005, 0.02)
    rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1)
    if rng.random() < 0.2:
        rgb = np.zeros_like(rgb)
    return xyz.astype(np.float32), rgb.astype(np.float32)


def report_missing_rooms(root, names, areas):
    """Prints a line for each area that holds fewer rooms than the release: its split's figures
    then do not compare with published ones, which are over every room."""
    for area in areas:
        held = sum(name.startswith(f"Area_{area}/") for name in names)
        if held < RELEASE_ROOMS[area]:
            hint = ""
            if area == 5 and "Area_5/hallway_6" not in names:
                hint = (" (Area_5/hallway_6 is missing: PointNet's collect_indoor3d_data.py skips "
                        "it at its malformed line; `python -m lib.data.s3dis --root ROOT "
                        "--skip-malformed` converts it from the raw release)")
            note(f"[s3dis] {root}: Area_{area} holds {held} of the release's "
                  f"{RELEASE_ROOMS[area]} rooms{hint}: figures over it do not compare with "
                  f"ones over the whole area")


class S3DISDataset(torch.utils.data.Dataset):
    """See the module docstring. `samples_per_epoch` (train only) defaults to the number of 4 cm
    cells in the training rooms divided by num_points: about one look at each cell per epoch.
    `seed` fixes the val/test crops; a training crop is drawn by (seed, epoch, sample index)
    (lib/data/transforms.sample_rng), whatever process or DataLoader worker reads it. `release`:
    the folder claims to be the S3DIS release, so an area with fewer rooms is reported (False for
    the generated rooms). `whole_rooms`: a training split too is read as val and test are, crops
    covering every point, voted (eval.py --split train); otherwise it draws random crops."""

    task = "semseg"
    class_names = list(CLASS_NAMES)
    num_classes = len(CLASS_NAMES)
    in_channels = 6  # rgb / 255, position normalised to the room's bounding box

    def __init__(self, root, split="train", num_points=None, augment=False, seed=0,
                 samples_per_epoch=None, processed_dir=None, skip_malformed=False,
                 release=True, whole_rooms=False):
        if split not in ("train", "val", "test", "trainval"):
            raise ValueError(f"unknown S3DIS split {split!r}; use train, val, test or trainval")
        self.split, self.augment, self.seed = split, augment, seed
        self.epoch = 0  # set by lib.data.transforms.set_epoch: the epoch augmentation draws for
        # random crops; val/test (and a training split scored whole) cover every point
        self.training = split in ("train", "trainval") and not whole_rooms
        self.num_points = num_points or DEFAULT_NUM_POINTS
        from lib.data.s3dis_forms import open_rooms  # it builds on this module's raw reader
        self.root = root
        self.source = source = open_rooms(root, processed_dir, skip_malformed)
        self.layout = source.layout
        areas = (TEST_AREA,) if split == "test" else tuple(a for a in AREAS if a != TEST_AREA)
        names = source.list_rooms(areas)
        if release:  # not for the generated rooms, which have few by design
            report_missing_rooms(root, names, areas)
        if split in ("train", "val"):
            held_out = names[::VAL_EVERY]
            names = held_out if split == "val" else [n for n in names if n not in held_out]
        if not names:
            raise ValueError(f"{root}: no rooms for the S3DIS {split} split")
        self.room_names = names
        self.rooms = [Room(source.read_room(name),
                           None if self.training else np.random.default_rng([seed, i]))
                      for i, name in enumerate(names)]
        if self.training:
            cells = np.array([len(room.counts) for room in self.rooms], dtype=np.float64)
            self.room_weights = cells / cells.sum()
            self.length = samples_per_epoch or max(1, int(cells.sum()) // self.num_points)
        else:
            self.crops = np.concatenate([  # (K, 3) rows (room, pass, centre)
                np.c_[np.full(len(c), r), c] for r, room in enumerate(self.rooms)
                for c in [covering_crops(room.xyz, room.starts, room.counts, self.num_points)]])
            self.length = len(self.crops)

    @property
    def num_rooms(self):
        return len(self.rooms)

    def source_files(self):
        """The files the split's rooms are read from (lib/data.file_listing): the raw release's
        annotation files (the source of its converted arrays), or each prepared room's arrays."""
        return [(path, None) for name in self.room_names for path in self.source.room_files(name)]

    def content_sha256(self, indices=None):
        """SHA-256 of the rooms at `indices` (all by default), in that order: each one's name
        and points in its file's order (the sorted order depends on the seed;
        lib/data/val_slice.val_sha256)."""
        def room(index):
            r = self.rooms[index]
            return (self.room_names[index], *(r.in_file_order(a) for a in (r.xyz, r.rgb, r.label)))
        return content_sha256(room(i) for i in (range(self.num_rooms) if indices is None
                                                else indices))

    def room_labels(self, room):
        """(N,) int64 labels of every original point of room `room` (an index < num_rooms)."""
        return torch.from_numpy(self.rooms[room].original_labels().astype(np.int64))

    def __len__(self):
        return self.length

    def make_voter(self):
        """Val/test crops are scored by voting per original point (lib/train.evaluate)."""
        return None if self.training else RoomVoter(self)

    def __getitem__(self, i):
        rng = sample_rng(self.training, self.seed, i, self.epoch)  # val/test: only pads small rooms
        if self.training:
            r = int(rng.choice(len(self.rooms), p=self.room_weights))
            room = self.rooms[r]
            pass_positions = random_pass(room.starts, room.counts, rng)  # (M,) one point per cell
            centre = int(rng.integers(len(pass_positions)))
        else:
            r, p, centre = (int(v) for v in self.crops[i])
            room = self.rooms[r]
            pass_positions = cycling_pass(room.starts, room.counts, p)
        crop = knn_crop(room.xyz[pass_positions], centre, self.num_points)
        positions = pass_positions[pad_by_resampling(crop, self.num_points, rng)]  # (num_points,)
        sample = self.make_sample(room, positions, rng)
        if not self.training:
            sample["room"] = torch.tensor(r, dtype=torch.int64)
            sample["index"] = torch.from_numpy(room.order[positions].astype(np.int64))
        return sample

    def make_sample(self, room, positions, rng):
        xyz = room.xyz[positions]  # (N, 3)
        centre = (xyz[:, :2].min(0) + xyz[:, :2].max(0)) / 2
        local = xyz - np.array([centre[0], centre[1], room.lo[2]], dtype=np.float32)
        rgb = room.rgb[positions].astype(np.float32) / 255
        if self.augment:
            local, rgb = augment_crop(local, rgb, rng)
        location = (xyz - room.lo) / room.extent
        return {"xyz": torch.from_numpy(local.astype(np.float32)),
                "feat": torch.from_numpy(np.concatenate([rgb, location], 1).astype(np.float32)),
                "label": torch.from_numpy(room.label[positions].astype(np.int64))}


class RoomVoter:
    """Test-time voting: sums the softmax scores of every crop that contains a point, per
    original point of each room, then predicts the argmax. Scores live on the CPU, one
    (N, num_classes) float32 array per room, made when the room's first crop arrives.

    Float sums depend on their order, and on near-even scores the order decides a point's
    argmax. So every rank adds every crop, in the order one process does: under DDP each rank
    scores whole one-process batches (lib.distributed.ShardedSampler), and in each round every
    rank hands its batch's scores to all (rank order is batch order) before any is added. The
    predictions are then one process's to the bit under any number of processes (summed per
    rank and then over ranks, they were not)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.scores = {}  # room -> (N, num_classes)

    def add(self, room, index, logits):
        """room: (B,) int64 (or a scalar), index: (B, N) (or (N,)), logits: (B, N, C) (or (N, C)).
        Under DDP every rank calls it once per batch, then join_rounds once."""
        room = torch.as_tensor(room, device=logits.device).reshape(-1)
        index = index.reshape(len(room), -1)
        probs = logits.detach().float().softmax(-1).reshape(len(room), index.shape[1], -1)
        if distributed.is_distributed():
            self._round((room, index, probs), logits.device)
        else:
            self._vote(room, index, probs)

    def join_rounds(self, device):
        """Under DDP: after this rank's last batch, takes part in the rounds in which other ranks
        still hand out batches (a rank scores one batch more than another at most), until every
        rank is done."""
        if distributed.is_distributed():
            while self._round(None, device):
                pass

    def _round(self, mine, device):
        """One round: every rank's batch this round (`mine`, None when done) added on every
        rank in rank order. Returns False when no rank had one left."""
        shapes = distributed.gather_objects(None if mine is None else tuple(mine[1].shape))
        if all(shape is None for shape in shapes):
            return False
        for src, shape in enumerate(shapes):
            if shape is None:
                continue
            if src == distributed.rank():
                room, index, probs = mine
                # one int64 message for the crops' rooms and point indices
                ids = torch.cat([room.reshape(-1, 1).to(index.dtype), index], 1)
                ids = ids.to(device, torch.int64)
            else:
                ids = torch.empty(shape[0], shape[1] + 1, dtype=torch.int64, device=device)
                probs = torch.empty(*shape, self.dataset.num_classes, device=device)
            distributed.broadcast_tensor_(ids, src)
            distributed.broadcast_tensor_(probs, src)
            self._vote(ids[:, 0], ids[:, 1:], probs)
        return True

    def _vote(self, room, index, probs):
        for r, idx, p in zip(room.tolist(), index.cpu(), probs.cpu()):
            self._room_scores(r).index_add_(0, idx, p)

    def _room_scores(self, room):
        """The (N, num_classes) scores of a room, zeros until its first vote."""
        if room not in self.scores:
            self.scores[room] = torch.zeros(len(self.dataset.rooms[room].label),
                                            self.dataset.num_classes)
        return self.scores[room]

    def finish(self):
        """Yields (pred (N,) int64, label (N,) int64) per room, in room order, releasing each
        room's scores. Raises if some original point of a room got no vote."""
        for r in range(self.dataset.num_rooms):
            scores = self.scores.pop(r, None)
            label = self.dataset.room_labels(r)
            missing = len(label) if scores is None else int((scores.sum(1) == 0).sum())
            if missing:
                raise RuntimeError(f"{self.dataset.room_names[r]}: {missing} of {len(label)} points got no vote")
            yield scores.argmax(1), label


# ---------------------------------------------------------------- command line

def get_args_parser():
    p = argparse.ArgumentParser(description="Convert the raw S3DIS release into per-room arrays.")
    p.add_argument("--root", required=True, help=f"folder holding {RAW_DIRNAME}/ (or that folder itself)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {PROCESSED_DIRNAME}/ beside the raw folder, "
                        f"{PROCESSED_DIRNAME}-<its name>/ for a raw folder of another name, or "
                        f"under data/cache/ where that is read-only); "
                        f"readable as a --data-root of its own")
    p.add_argument("--skip-malformed", action="store_true",
                   help="drop malformed lines (the release has one, Area_5/hallway_6/Annotations/"
                        "ceiling_1.txt line 180389) instead of stopping at them; each is reported")
    p.add_argument("--workers", type=int, default=1, help="rooms converted in parallel")
    return p


def main(args):
    raw_dir = find_raw_dir(args.root)
    out_dir = args.out or default_processed_dir(raw_dir)
    start = time.perf_counter()
    converted = preprocess(raw_dir, out_dir, AREAS, args.skip_malformed, args.workers)
    print(f"{len(converted)} of {len(list_rooms(raw_dir, AREAS))} rooms converted into {out_dir} "
          f"in {time.perf_counter() - start:.1f} s (the others were up to date)")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
