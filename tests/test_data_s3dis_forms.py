"""S3DIS as other repositories prepare it (per-room N x 7 .npy; Pointcept's per-room folders):
read back with the raw release's points and labels, told apart from the raw release, and bad
files refused in one line naming the file."""
import re
import shutil

import h5py
import numpy as np
import pytest

from lib.data import build_dataset, s3dis
from lib.data.__main__ import main as check_data
from lib.data.s3dis import S3DISDataset
from lib.data.synthetic_layouts import rooms_as
from lib.data.synthetic_rooms import write_rooms
from lib.experiment import load_split


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rooms")
    write_rooms(str(root / "raw"), seed=0, rooms_per_area=2, points_per_m2=30.0)
    for layout in ("npy", "pointcept"):
        rooms_as(root / "raw", root / layout, layout)
    # the pre-pass into a folder of the user's choice, which is then a data root of its own
    s3dis.main(s3dis.get_args_parser().parse_args(["--root", str(root / "raw"), "--out",
                                                   str(root / "converted")]))
    return root


def original_order(room):
    """xyz, rgb, label of a Room in the order its file holds them."""
    arrays = []
    for sorted_values in (room.xyz, room.rgb, room.label):
        values = np.empty_like(sorted_values)
        values[room.order] = sorted_values
        arrays.append(values)
    return arrays


@pytest.mark.parametrize("layout, expected", [("npy", "per-room N x 7 .npy"),
                                              ("pointcept", "Pointcept"),
                                              ("converted", "rooms converted")])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_form_reads_back_the_raw_rooms(forms, layout, expected, split, tmp_path):
    raw = S3DISDataset(str(forms / "raw"), split, processed_dir=str(tmp_path))
    other = S3DISDataset(str(forms / layout), split)
    assert other.layout.startswith(expected) and raw.layout.startswith("raw release")
    assert other.room_names == raw.room_names and len(other) == len(raw)
    for room, raw_room in zip(other.rooms, raw.rooms):
        xyz, rgb, label = original_order(room)
        raw_xyz, raw_rgb, raw_label = original_order(raw_room)
        np.testing.assert_array_equal(label, raw_label)
        np.testing.assert_array_equal(rgb, raw_rgb)
        if layout == "npy":  # PointNet's files move the room's minimum to the origin
            np.testing.assert_allclose(xyz, raw_xyz - raw_xyz.min(0), atol=1e-5)
        else:
            np.testing.assert_array_equal(xyz, raw_xyz)


def test_npy_rooms_are_found_in_the_folders_the_repos_name(forms, tmp_path):
    shutil.copytree(forms / "npy", tmp_path / "stanford_indoor3d")
    assert S3DISDataset(str(tmp_path), "test").layout.startswith("per-room N x 7 .npy")


def test_npy_rooms_are_found_in_pointnexts_folder(forms, tmp_path):
    """PointNeXt keeps the N x 7 rooms in data/S3DIS/s3disfull/raw/."""
    shutil.copytree(forms / "npy", tmp_path / "s3disfull" / "raw")
    data = S3DISDataset(str(tmp_path / "s3disfull"), "test")
    assert data.layout.startswith("per-room N x 7 .npy") and data.room_names


def test_rooms_missing_from_an_area_are_reported(forms, capsys):
    """PointNet's collect_indoor3d_data.py drops Area_5/hallway_6 with a printed "ERROR!!" only,
    which made published tests over 67 of its 68 rooms."""
    S3DISDataset(str(forms / "npy"), "test")
    out = capsys.readouterr().out
    assert out.count("of the release's") == 1
    assert "Area_5 holds 2 of the release's 68 rooms (Area_5/hallway_6 is missing: PointNet's " \
           "collect_indoor3d_data.py skips it" in out
    S3DISDataset(str(forms / "npy"), "train")
    assert capsys.readouterr().out.count("of the release's") == 5  # areas 1-4 and 6
    build_dataset("synthetic_rooms", forms / "npy", "test")  # generated rooms: few by design
    assert "of the release's" not in capsys.readouterr().out


def test_each_remark_on_the_folder_is_printed_once_per_process(forms, capsys):
    """A training script reads the train and val splits (and the test split for its final
    score): the form found and each area short of rooms were printed once per read."""
    for split in ("train", "val", "test"):
        load_split("s3dis", str(forms / "npy"), split)
    out = capsys.readouterr().out
    assert out.count("per-room N x 7 .npy (") == 1
    assert out.count("Area_1 holds 2 of the release's 44 rooms") == 1
    assert out.count("of the release's") == 6  # areas 1-6, once each


def test_older_pointcept_rooms_are_named(tmp_path):
    (tmp_path / "Area_1").mkdir()
    (tmp_path / "Area_1" / "office_1.pth").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="Area_N/<room>.pth .* older versions of "
                                                "Pointcept's preprocess_s3dis.py"):
        S3DISDataset(str(tmp_path), "test")


@pytest.mark.parametrize("inside", ["", "indoor3d_sem_seg_hdf5_data", "raw"])
def test_pointnets_sem_seg_blocks_are_named_with_what_to_use(tmp_path, inside):
    """PointNet's (and DGCNN's) S3DIS download, indoor3d_sem_seg_hdf5_data: 1 m blocks of 4096
    resampled points, from which no room can be scored point by point (PyG's S3DIS dataset
    keeps them in raw/)."""
    folder = tmp_path / inside
    folder.mkdir(exist_ok=True)
    with h5py.File(folder / "ply_data_all_0.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 4096, 9), np.float32))
        f.create_dataset("label", data=np.zeros((2, 4096), np.uint8))
    (folder / "all_files.txt").write_text(f"{folder.name}/ply_data_all_0.h5\n")
    (folder / "room_filelist.txt").write_text("Area_1_conferenceRoom_1\n" * 2)
    named = re.escape(f"{folder}: PointNet's indoor3d_sem_seg_hdf5_data ")
    with pytest.raises(FileNotFoundError, match=named + r".* not read: .* use the N x 7 \.npy") as err:
        S3DISDataset(str(tmp_path), "test")
    assert "\n" not in str(err.value)


def test_damaged_converted_room_is_named(forms, tmp_path):
    """The converted folder is a data root of its own, so it gets copied: a partial copy."""
    root = shutil.copytree(forms / "converted", tmp_path / "converted")
    path = sorted(root.glob("Area_5/*.npz"))[0]
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{path.name}: not a room converted by "
                                         rf"lib.data.s3dis \(") as err:
        S3DISDataset(str(root), "test")
    assert "\n" not in str(err.value)


def test_damaged_conversion_of_the_raw_release_is_done_again(forms, tmp_path, capsys):
    before = S3DISDataset(str(forms / "raw"), "test", processed_dir=str(tmp_path))
    path = sorted(tmp_path.glob("Area_5/*.npz"))[0]
    path.write_bytes(path.read_bytes()[:100])  # still newer than the annotations
    after = S3DISDataset(str(forms / "raw"), "test", processed_dir=str(tmp_path))
    assert "not a room converted by lib.data.s3dis" in capsys.readouterr().err
    for room, again in zip(before.rooms, after.rooms):
        np.testing.assert_array_equal(room.xyz, again.xyz)
        np.testing.assert_array_equal(room.label, again.label)


def test_data_check_fails_on_a_damaged_file(forms, tmp_path, capsys):
    """python -m lib.data as a scripted check: a damaged file is a failing status."""
    root, path = area5_npy(forms, tmp_path)
    args = type("Args", (), dict(dataset="s3dis", data_root=str(root), num_points=None))
    check_data(args)  # every split readable
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="the test split stopped at a problem"):
        check_data(args)
    assert f"test: {path}: not a readable .npy array" in capsys.readouterr().out


# how each form holds one area's rooms
AREA_FILES = {"npy": "Area_{}_*.npy", "pointcept": "Area_{}",
              "raw": "Stanford3dDataset_v1.2_Aligned_Version/Area_{}"}


@pytest.mark.parametrize("layout", sorted(AREA_FILES))
def test_data_check_fails_on_an_area_missing_beside_the_others(forms, tmp_path, capsys, layout):
    """python -m lib.data as a scripted check: a copy without Area_3 could read neither its train
    nor its val split (an area missing was a plain FileNotFoundError, a split absent by choice),
    and the check exited 0 on its test split; a folder holding Area 5 alone, to score on,
    passes."""
    root = shutil.copytree(forms / layout, tmp_path / layout)
    args = type("Args", (), dict(dataset="s3dis", data_root=str(root), num_points=None))

    def remove_area(area):
        for path in root.glob(AREA_FILES[layout].format(area)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    remove_area(3)
    with pytest.raises(SystemExit, match="the train, val split stopped at a problem"):
        check_data(args)
    said = capsys.readouterr().out
    said_of_area_3 = r"\ntrain: \S*(Area_3: missing|: no rooms of Area_3) \(S3DIS areas"
    assert re.search(said_of_area_3, said), said
    for area in (1, 2, 4, 6):
        remove_area(area)
    check_data(args)  # no training area at all: those splits are absent, the check passes
    assert "test: 7 samples" in capsys.readouterr().out


def test_unknown_folder_names_the_supported_layouts(tmp_path):
    (tmp_path / "Area_1" / "office_1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no S3DIS layout found; supported: the raw "
                                                "release.*Area_N_<room>.npy.*Pointcept"):
        S3DISDataset(str(tmp_path), "test")


@pytest.mark.parametrize("layout", ["pointcept", "npy"])
def test_a_form_one_folder_down_is_named_with_the_data_root_to_give(forms, tmp_path, layout):
    """Pointcept's s3dis.tar.gz unpacked into a folder of its own name: s3dis/s3dis/Area_N/."""
    shutil.copytree(forms / layout, tmp_path / "s3dis" / "s3dis")
    with pytest.raises(FileNotFoundError) as err:
        S3DISDataset(str(tmp_path / "s3dis"), "test")
    assert "\n" not in str(err.value)
    assert "no S3DIS layout found, but its subfolder s3dis/ does" in str(err.value)
    assert f"give --data-root {tmp_path / 's3dis' / 's3dis'}; supported" in str(err.value)


def area5_npy(forms, tmp_path):
    root = shutil.copytree(forms / "npy", tmp_path / "npy")
    return root, sorted(root.glob("Area_5_*.npy"))[0]


@pytest.mark.parametrize("change, message", [
    (lambda t: t[:, :6], r"expected an N x 7 array \(x y z r g b label\), found shape \(\d+, 6\)"),
    (lambda t: np.column_stack([t[:, :6], np.full(len(t), 13.0)]),
     r"point 0: label 13 is not one of the 13 S3DIS classes \(0\.\.12\)"),
    (lambda t: np.column_stack([t[:, :6], np.full(len(t), 2.5)]), r"point 0: label 2\.5"),
    (lambda t: np.column_stack([t[:, :3], np.full((len(t), 3), 300.0), t[:, 6]]),
     r"point 0: colour outside 0\.\.255"),
    (lambda t: np.column_stack([t[:, :3], t[:, 3:6] / 255, t[:, 6]]),
     r"every colour lies within 0\.\.1 \(largest [\d.]+\): colours are read on the release's "
     r"0\.\.255"),
    (lambda t: np.where(np.arange(7) == 0, np.nan, t), r"point 0: NaN or infinite coordinates"),
    (lambda t: t[:0], "the room has no points"),
])
def test_bad_npy_room_is_one_line_naming_the_file(forms, tmp_path, change, message):
    root, path = area5_npy(forms, tmp_path)
    np.save(path, change(np.load(path)))
    with pytest.raises(ValueError, match=rf"{path.name}: {message}") as err:
        S3DISDataset(str(root), "test")
    assert "\n" not in str(err.value)


def test_a_room_without_colours_is_read(forms, tmp_path):
    """All-zero colours (a colourless export) are not the 0..1 scale refused above."""
    root, path = area5_npy(forms, tmp_path)
    table = np.load(path)
    table[:, 3:6] = 0
    np.save(path, table)
    room = S3DISDataset(str(root), "test").rooms[0]
    assert not room.rgb.any()


def test_truncated_npy_room_is_named(forms, tmp_path):
    root, path = area5_npy(forms, tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{path.name}: not a readable \.npy array") as err:
        S3DISDataset(str(root), "test")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, change, message", [
    ("segment.npy", lambda a: a[1:], r"expected shape \(\d+, 1\) like coord\.npy"),
    ("color.npy", lambda a: a[:, :2], r"expected shape \(\d+, 3\) like coord\.npy"),
    ("segment.npy", lambda a: np.full_like(a, -1), r"label -1 is not one of the 13"),
])
def test_bad_pointcept_room_is_one_line_naming_the_file(forms, tmp_path, name, change, message):
    root = shutil.copytree(forms / "pointcept", tmp_path / "pointcept")
    path = sorted(root.glob(f"Area_5/*/{name}"))[0]
    np.save(path, change(np.load(path)))
    with pytest.raises(ValueError, match=rf"{name}: .*{message}") as err:
        S3DISDataset(str(root), "test")
    assert "\n" not in str(err.value)


def test_missing_area_is_an_error(forms, tmp_path):
    root = shutil.copytree(forms / "pointcept", tmp_path / "pointcept")
    shutil.rmtree(root / "Area_6")
    with pytest.raises(FileNotFoundError, match="no rooms of Area_6"):
        S3DISDataset(str(root), "train")


@pytest.mark.parametrize("which", [0, -1])  # the first room of Area_1 (which told the form) or not
def test_a_pointcept_room_without_its_coordinates_is_named_not_dropped(forms, tmp_path, which):
    """A room left out would make a smaller Area 5 and smaller metrics, without a word."""
    root = shutil.copytree(forms / "pointcept", tmp_path / "pointcept")
    room = sorted((root / ("Area_1" if which == 0 else "Area_5")).iterdir())[which]
    (room / "coord.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{room}: no coord.npy \(a Pointcept room"):
        S3DISDataset(str(root), "test" if which else "train")


def test_hidden_folders_in_an_area_are_not_rooms(forms, tmp_path):
    """Jupyter leaves .ipynb_checkpoints/ in the folders it browsed."""
    root = shutil.copytree(forms / "pointcept", tmp_path / "pointcept")
    (root / "Area_5" / ".ipynb_checkpoints").mkdir()
    assert S3DISDataset(str(root), "test").room_names == S3DISDataset(
        str(forms / "pointcept"), "test").room_names


def test_val_sha256_tells_the_held_out_rooms_by_name_and_points(forms, tmp_path):
    """What a run records of its validation split (lib/data/val_slice.val_sha256), compared at
    resume: it was None for S3DIS, so a held-out room changed (re-converted, replaced) between a
    run and its resume went unseen. The seed, which orders each room's points, does not count."""
    from lib.data.val_slice import val_sha256
    root = shutil.copytree(forms / "npy", tmp_path / "npy")
    first = val_sha256(S3DISDataset(str(root), "val"))
    assert len(first) == 64 and val_sha256(S3DISDataset(str(root), "val", seed=1)) == first
    held_out = sorted(root.glob("Area_1_*.npy"))[0]  # every 10th room from the first
    room = np.load(held_out)
    room[0, 6] = (room[0, 6] + 1) % 13  # one point's label
    np.save(held_out, room)
    assert val_sha256(S3DISDataset(str(root), "val")) != first
