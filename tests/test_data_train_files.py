"""What a run records of its training split's files (lib/data.file_listing), for every form each
reader family reads: the files its training shapes or rooms come from, sizes as on disk, and
for an h5 file the number of the split's shapes it holds. (A resume compares them:
tests/test_fault_drills.py, test_a_run_resumed_on_replaced_training_files_is_refused.)"""
import os
import re

import pytest

from lib.data import file_listing, listing_changes, s3dis
from lib.data.synthetic import get_args_parser, main
from lib.data.synthetic_layouts import rooms_as
from lib.data.synthetic_rooms import write_rooms
from lib.experiment import load_split


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    main(get_args_parser().parse_args(["--out", str(root), "--only", "parts", "parts_v0",
                                       "parts_hdf5", "cls", "cls_off", "--train-shapes", "2",
                                       "--eval-shapes", "1"]))
    write_rooms(str(root / "rooms"), seed=0, rooms_per_area=2, points_per_m2=30.0)
    for layout in ("npy", "pointcept"):
        rooms_as(root / "rooms", root / f"rooms_{layout}", layout)
    s3dis.main(s3dis.get_args_parser().parse_args(["--root", str(root / "rooms"), "--out",
                                                   str(root / "rooms_converted")]))
    return root


# form: (dataset, folder, files per training sample (a shape; a room for S3DIS; None: h5 files))
FORMS = {
    "shapenet v0_normal": ("shapenet_part", "parts", 1),
    "shapenet v0": ("shapenet_part", "parts_v0", 2),  # .pts + .seg
    "shapenet hdf5": ("shapenet_part", "parts_hdf5", None),
    "modelnet resampled": ("modelnet40", "cls/modelnet40_normal_resampled", 1),
    "modelnet hdf5": ("modelnet40", "cls/modelnet40_ply_hdf5_2048", None),
    "modelnet off": ("modelnet40", "cls_off", 1),
    "s3dis npy": ("s3dis", "rooms_npy", 1),
    "s3dis pointcept": ("s3dis", "rooms_pointcept", 3),  # coord, color, segment
    "s3dis converted": ("s3dis", "rooms_converted", 1),  # python -m lib.data.s3dis --out
}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_lists_its_training_samples_files_with_their_sizes(forms, form):
    name, folder, per_sample = FORMS[form]
    root = forms / folder
    train = load_split(name, str(root), "train", 64)
    listing = file_listing(train)
    samples = train.num_rooms if name == "s3dis" else len(train)
    assert listing == sorted(listing) and all(os.path.getsize(root / path) == size
                                              for path, size, *_ in listing)
    if per_sample is None:  # the h5 files, each with the training shapes it holds
        assert sum(entry[2] for entry in listing) == samples
    else:
        assert len(listing) == per_sample * samples and all(len(e) == 2 for e in listing)
    if name == "s3dis":  # the training rooms' files, none of a val room's
        assert {room_of(path) for path, _ in listing} == set(train.room_names)


def room_of(path):
    """Area_N/<room> of a prepared room's file: Area_N_<room>.npy, Area_N/<room>/<array>.npy or
    Area_N/<room>.npz."""
    npy = re.fullmatch(r"(Area_\d)_(.+)\.npy", path)
    return (f"{npy[1]}/{npy[2]}" if npy else path.removesuffix(".npz") if path.endswith(".npz")
            else os.path.dirname(path))


def test_the_raw_release_lists_its_training_rooms_annotation_files(forms):
    """The raw release's rooms are read from the arrays converted from their annotation files:
    those (the source) are listed, every one of each training room's and none of a val room's."""
    root = forms / "rooms"
    train, val = (load_split("s3dis", str(root), split, 64) for split in ("train", "val"))
    listing = file_listing(train)
    rooms = {os.path.dirname(os.path.dirname(path)) for path, _ in listing}
    release = "Stanford3dDataset_v1.2_Aligned_Version"
    assert rooms == {f"{release}/{room}" for room in train.room_names}
    assert not rooms & {f"{release}/{room}" for room in val.room_names}
    assert len(listing) == sum(len(os.listdir(root / room / "Annotations")) for room in rooms)


def test_listing_changes_counts_and_names_what_differs():
    recorded = [["a.txt", 10], ["b.h5", 20, 4], ["c.txt", 30]]
    assert listing_changes(recorded, [["a.txt", 11], ["b.h5", 20, 5], ["d.txt", 1]]) == (
        "2 files differ, 1 file added, 1 file removed of the 3 recorded, e.g. a.txt now 11 "
        "bytes (recorded 10 bytes)")
    assert listing_changes(recorded, recorded[:2]) == ("1 file removed of the 3 recorded, e.g. "
                                                       "c.txt removed")
