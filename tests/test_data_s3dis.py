import os
import tracemalloc

import numpy as np
import pytest
import torch

from lib.data import DATA_DIR, s3dis
from lib.data.grid import grid_subsample
from lib.data.s3dis import CLASS_NAMES, RAW_DIRNAME, RoomVoter, S3DISDataset, preprocess, read_room
from lib.data.synthetic_rooms import write_rooms
from lib.data.transforms import set_epoch

DENSITY = 40.0  # points per m^2: rooms of a few thousand points keep these tests fast


@pytest.fixture(scope="module")
def rooms_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rooms")
    write_rooms(str(root), seed=0, rooms_per_area=3, points_per_m2=DENSITY)
    return str(root)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def read(path):
    with open(path) as f:
        return f.read()


def raw_dir(root):
    return os.path.join(root, RAW_DIRNAME)


def test_write_rooms_layout_is_the_release_format_and_deterministic(tmp_path, rooms_root):
    write_rooms(str(tmp_path), seed=0, areas=(5,), rooms_per_area=3, points_per_m2=DENSITY)
    for name in s3dis.list_rooms(raw_dir(str(tmp_path)), (5,)):
        room_dir = os.path.join(raw_dir(str(tmp_path)), name)
        files = s3dis.annotation_files(room_dir)
        assert all(s3dis.annotation_class(f) >= 0 for f in files)
        room_lines = read(os.path.join(room_dir, os.path.basename(name) + ".txt")).splitlines()
        assert sorted(room_lines) == sorted(line for f in files for line in read(f).splitlines())
        assert all(len(line.split(" ")) == 6 for line in room_lines)  # x y z r g b
        # Area 5 written alone is byte-identical to Area 5 written with all areas.
        for f in files:
            assert read(f) == read(os.path.join(raw_dir(rooms_root), name, "Annotations", os.path.basename(f)))


def test_every_area_of_the_synthetic_rooms_holds_all_13_classes(rooms_root):
    for area in range(1, 7):
        classes = {s3dis.annotation_class(f) for name in s3dis.list_rooms(raw_dir(rooms_root), (area,))
                   for f in s3dis.annotation_files(os.path.join(raw_dir(rooms_root), name))}
        assert classes == set(range(13)), area


def test_every_class_label_is_read_right(tmp_path):
    room_dir = tmp_path / RAW_DIRNAME / "Area_1" / "office_1"
    for c, name in enumerate(CLASS_NAMES):  # x encodes the class, colour is distinct per class
        write_lines(str(room_dir / "Annotations" / f"{name}_1.txt"),
                    [f"{c}.000 {k}.500 2.250 {c} {10 + k} 255" for k in range(3)])
    write_lines(str(room_dir / "Annotations" / "stairs_1.txt"), ["20.000 0.000 0.000 1 2 3"])
    xyz, rgb, label = read_room(str(room_dir))
    assert (xyz.dtype, rgb.dtype, label.dtype) == (np.float32, np.uint8, np.uint8)
    assert len(label) == 3 * 13 + 1
    stairs = xyz[:, 0] == 20
    assert (label[stairs] == CLASS_NAMES.index("clutter")).all()
    np.testing.assert_array_equal(label[~stairs], xyz[~stairs, 0].astype(np.uint8))
    np.testing.assert_array_equal(rgb[~stairs, 0], label[~stairs])
    np.testing.assert_array_equal(rgb[~stairs, 1] - 10, xyz[~stairs, 1] - 0.5)
    assert np.allclose(xyz[:, 2][~stairs], 2.25)


def test_processed_labels_match_the_annotation_files(rooms_root, tmp_path):
    out = str(tmp_path / "npy")
    converted = preprocess(raw_dir(rooms_root), out, areas=(2,))
    assert converted == s3dis.list_rooms(raw_dir(rooms_root), (2,))
    for name in converted:
        data = np.load(os.path.join(out, name + ".npz"))
        files = s3dis.annotation_files(os.path.join(raw_dir(rooms_root), name))
        expected = np.concatenate([np.full(len(np.loadtxt(f, ndmin=2)), s3dis.annotation_class(f)) for f in files])
        np.testing.assert_array_equal(data["label"], expected)
        assert len(np.unique(data["label"])) >= 5  # floor, ceiling, wall, door and furniture at least


def test_preprocessing_is_skipped_when_up_to_date(rooms_root, tmp_path):
    out = str(tmp_path / "npy")
    assert len(preprocess(raw_dir(rooms_root), out, areas=(3,))) == 3
    first = {n: os.path.getmtime(os.path.join(out, n + ".npz")) for n in s3dis.list_rooms(raw_dir(rooms_root), (3,))}
    assert preprocess(raw_dir(rooms_root), out, areas=(3,)) == []
    assert first == {n: os.path.getmtime(os.path.join(out, n + ".npz")) for n in first}
    # Age one room's arrays rather than touch the shared raw files: its annotations are now newer.
    stale = sorted(first)[1]
    os.utime(os.path.join(out, stale + ".npz"), (first[stale] - 3600, first[stale] - 3600))
    assert preprocess(raw_dir(rooms_root), out, areas=(3,)) == [stale]


@pytest.mark.parametrize("bad, problem", [
    # The release's own defect (Area_5/hallway_6/Annotations/ceiling_1.txt, line 180389): a
    # stray character where a space belongs.
    ("22.350 6.692 3.048 185\x00187 182", "expected 6 columns, found 5"),
    ("1.000 2.\xb50 3.000 4 5 6", "codec can't decode"),
    ("1.000 2.000 x 4 5 6", "not a number"),
    ("nan 2.000 3.000 4 5 6", "NaN"),
    ("1.000 2.000 3.000 4 5 300", "colour outside 0..255"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, problem):
    room_dir = tmp_path / "Area_5" / "hallway_6"
    path = room_dir / "Annotations" / "ceiling_1.txt"
    path.parent.mkdir(parents=True)
    lines = ["0.000 0.000 0.000 1 2 3", "", "1.000 1.000 1.000 1 2 3", bad, "2.000 2.000 2.000 1 2 3"]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    # A byte that is not UTF-8 gets the file named but not the line (lib.data.read_point_table).
    where = "" if "codec" in problem else " line 4:"
    with pytest.raises(ValueError, match=rf"ceiling_1\.txt:{where} .*{problem}.*--skip-malformed"):
        read_room(str(room_dir))
    xyz, _, _ = read_room(str(room_dir), skip_malformed=True)
    np.testing.assert_array_equal(xyz[:, 0], [0, 1, 2])


def test_odd_annotation_names_are_left_out(tmp_path):
    room_dir = tmp_path / "Area_5" / "office_36"
    write_lines(str(room_dir / "Annotations" / "wall_3.txt"), ["0 0 0 1 2 3"])
    write_lines(str(room_dir / "Annotations" / "wall_3 (1).txt"), ["0 0 0 1 2 3"])  # the release's duplicate
    write_lines(str(room_dir / "Annotations" / "notes.md"), ["not points"])
    assert len(read_room(str(room_dir))[0]) == 1


def test_unknown_class_and_missing_folders_are_clear_errors(tmp_path):
    write_lines(str(tmp_path / "Area_1" / "r" / "Annotations" / "chandelier_1.txt"), ["0 0 0 1 2 3"])
    with pytest.raises(ValueError, match=r"chandelier_1\.txt: unknown class 'chandelier'"):
        read_room(str(tmp_path / "Area_1" / "r"))
    with pytest.raises(FileNotFoundError, match="no Annotations folder"):
        read_room(str(tmp_path / "Area_1"))
    with pytest.raises(FileNotFoundError, match=r"Area_2: missing"):
        S3DISDataset(str(tmp_path), "train")
    for area in (2, 3, 4, 6):  # an empty Area folder is missing rooms too (the converted
        (tmp_path / f"Area_{area}").mkdir()  # folder said so; the raw release read on)
    with pytest.raises(FileNotFoundError, match=r"Area_2: no rooms"):
        S3DISDataset(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match=RAW_DIRNAME):
        S3DISDataset(str(tmp_path / "nowhere"), "train")


def test_grid_subsampling_keeps_one_point_per_4cm_cell():
    rng = np.random.default_rng(0)
    xyz = (rng.random((20000, 3)) * [1.0, 1.0, 0.2]).astype(np.float32)  # ~16 points per cell
    cells = np.floor((xyz - xyz.min(0)) / 0.04).astype(np.int64)
    occupied = len(np.unique(cells, axis=0))
    picks = [grid_subsample(xyz, 0.04, rng) for _ in range(2)] + [grid_subsample(xyz, 0.04)]
    for idx in picks:
        assert len(idx) == occupied == len(np.unique(cells[idx], axis=0))
    assert (np.sort(picks[0]) != np.sort(picks[1])).any()  # training picks a random point per cell


def test_train_crops_have_fixed_size_and_documented_inputs(rooms_root):
    ds = S3DISDataset(rooms_root, "train", num_points=1024, seed=0)
    assert (ds.task, ds.num_classes, ds.in_channels, ds.class_names) == ("semseg", 13, 6, list(CLASS_NAMES))
    torch.manual_seed(0)
    for sample in (ds[0], ds[1]):
        assert sample["xyz"].shape == (1024, 3) and sample["feat"].shape == (1024, ds.in_channels)
        assert sample["xyz"].dtype == sample["feat"].dtype == torch.float32
        assert sample["label"].dtype == torch.int64 and 0 <= sample["label"].min() <= sample["label"].max() < 13
        xy = sample["xyz"][:, :2]
        assert torch.allclose((xy.min(0).values + xy.max(0).values) / 2, torch.zeros(2), atol=1e-4)
        assert sample["xyz"][:, 2].min() >= 0 and 0 <= sample["feat"].min() and sample["feat"].max() <= 1
    first = ds[0]["xyz"]
    set_epoch(ds, 1)
    assert not torch.equal(first, ds[0]["xyz"])  # a fresh random crop each epoch
    aug = S3DISDataset(rooms_root, "train", num_points=1024, augment=True, samples_per_epoch=5)
    assert len(aug) == 5
    batch = next(iter(torch.utils.data.DataLoader(aug, batch_size=2)))
    assert batch["xyz"].shape == (2, 1024, 3) and batch["feat"].shape == (2, 1024, 6)
    big = S3DISDataset(rooms_root, "train", num_points=20000)  # more than any room's cells: padded
    assert big[0]["xyz"].shape == (20000, 3)


def test_val_is_a_fixed_tenth_of_the_training_rooms(rooms_root):
    names = s3dis.list_rooms(raw_dir(rooms_root), (1, 2, 3, 4, 6))
    train = S3DISDataset(rooms_root, "train", samples_per_epoch=1).room_names
    val = S3DISDataset(rooms_root, "val", num_points=4096).room_names
    test = S3DISDataset(rooms_root, "test", num_points=4096).room_names
    assert val == names[::10] and not set(val) & set(train) and sorted(val + train) == sorted(names)
    assert test == s3dis.list_rooms(raw_dir(rooms_root), (5,))


def test_test_crops_cover_every_point_and_one_hot_votes_give_the_labels(rooms_root):
    ds = S3DISDataset(rooms_root, "test", num_points=1024, seed=3)
    assert ds.num_rooms == 3
    seen = [torch.zeros(len(ds.room_labels(r)), dtype=torch.bool) for r in range(ds.num_rooms)]
    voter = RoomVoter(ds)
    for i in range(len(ds)):
        sample = ds[i]
        r = int(sample["room"])
        assert sample["index"].dtype == torch.int64 and sample["xyz"].shape == (1024, 3)
        assert torch.equal(sample["label"], ds.room_labels(r)[sample["index"]])
        seen[r][sample["index"]] = True
        voter.add(sample["room"][None], sample["index"][None],
                  torch.nn.functional.one_hot(sample["label"], 13)[None].float() * 10)
    assert all(s.all() for s in seen)  # the union of the crops' indices is every original point
    results = list(voter.finish())
    assert len(results) == 3
    for r, (pred, label) in enumerate(results):
        assert torch.equal(pred, label) and torch.equal(label, ds.room_labels(r))
    again = S3DISDataset(rooms_root, "test", num_points=1024, seed=3)
    assert len(again) == len(ds) and torch.equal(again[len(ds) - 1]["index"], ds[len(ds) - 1]["index"])


def test_voter_refuses_a_room_with_unvoted_points(rooms_root):
    ds = S3DISDataset(rooms_root, "test", num_points=1024)
    voter = RoomVoter(ds)
    sample = ds[0]
    voter.add(sample["room"], sample["index"], torch.zeros(1024, 13))
    with pytest.raises(RuntimeError, match="points got no vote"):
        list(voter.finish())


def test_80k_point_room_is_processed_in_bounded_memory(tmp_path):
    write_rooms(str(tmp_path), seed=1, areas=(1,), rooms_per_area=1, points_per_m2=950)
    room_dir = os.path.join(raw_dir(str(tmp_path)), s3dis.list_rooms(raw_dir(str(tmp_path)), (1,))[0])
    tracemalloc.start()
    s3dis.convert_room(room_dir, str(tmp_path / "room.npz"), False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = len(np.load(tmp_path / "room.npz")["label"])
    assert n >= 80000
    assert peak < 48 * n  # bytes: twice the 16 bytes per point kept plus one file's parse


def test_command_line_preprocesses_once(rooms_root, capsys):
    args = s3dis.get_args_parser().parse_args(["--root", rooms_root])
    s3dis.main(args)
    s3dis.main(args)
    assert "0 of 18 rooms converted" in capsys.readouterr().out


def test_samples_per_epoch_sets_the_training_epoch_and_only_there(rooms_root):
    from lib.data import build_dataset
    assert len(build_dataset("synthetic_rooms", rooms_root, "train", samples_per_epoch=7)) == 7
    for name, split in (("synthetic_rooms", "val"), ("synthetic_parts", "train")):
        with pytest.raises(ValueError, match="only the S3DIS training split"):
            build_dataset(name, rooms_root, split, samples_per_epoch=7)


def test_a_read_only_release_is_converted_under_data_cache(tmp_path, monkeypatch):
    """A lab's shared, read-only dataset mount: the rooms cannot be converted beside it."""
    raw = tmp_path / "shared" / RAW_DIRNAME
    raw.mkdir(parents=True)
    beside = tmp_path / "shared" / s3dis.PROCESSED_DIRNAME
    assert s3dis.default_processed_dir(str(raw)) == str(beside)
    real_access = os.access
    monkeypatch.setattr(s3dis.os, "access", lambda path, mode: (
        False if os.path.realpath(path) == str(tmp_path / "shared") else real_access(path, mode)))
    cached = s3dis.default_processed_dir(str(raw))
    assert os.path.dirname(cached) == str(DATA_DIR / "cache")
    assert os.path.basename(cached).startswith(s3dis.PROCESSED_DIRNAME + "-")
    other = tmp_path / "shared" / "elsewhere" / RAW_DIRNAME  # another release: its own folder
    assert s3dis.default_processed_dir(str(other)) not in (cached, str(beside))
    beside.mkdir()  # converted there already (by whoever could write): read from there
    assert s3dis.default_processed_dir(str(raw)) == str(beside)


def test_a_release_folder_named_as_data_names_it_converts_into_s3dis_npy(tmp_path):
    """data/s3dis/ (a name the default root looks for) keeps the s3dis_npy/ it converted into
    before releases of other names got their own folders: no conversion done again."""
    assert s3dis.default_processed_dir(str(tmp_path / "s3dis")) == str(tmp_path / "s3dis_npy")
    assert s3dis.default_processed_dir(str(tmp_path / RAW_DIRNAME)) == str(tmp_path / "s3dis_npy")
    assert s3dis.default_processed_dir(str(tmp_path / "Stanford3dDataset_v1.2")) == \
        str(tmp_path / "s3dis_npy-Stanford3dDataset_v1.2")


def test_two_releases_in_one_folder_never_share_converted_rooms(tmp_path):
    """Stanford's unaligned Stanford3dDataset_v1.2 unpacks beside the aligned release. unzip
    keeps the archive's old file times, so a conversion shared by both (one s3dis_npy/) was
    up to date for the second, which then read the first's rooms (here: other coordinates)."""
    write_rooms(str(tmp_path), seed=0, areas=(5,), rooms_per_area=1, points_per_m2=DENSITY)
    aligned = raw_dir(str(tmp_path))
    unaligned = str(tmp_path / "Stanford3dDataset_v1.2")
    for room in sorted(os.listdir(os.path.join(aligned, "Area_5"))):
        folder = os.path.join(aligned, "Area_5", room, "Annotations")
        for name in os.listdir(folder):
            rows = np.loadtxt(os.path.join(folder, name), ndmin=2)
            rows[:, 0] += 100  # the same room, turned or moved: other coordinates
            out = os.path.join(unaligned, "Area_5", room, "Annotations", name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            np.savetxt(out, rows, fmt="%.3f %.3f %.3f %d %d %d")
    for folder, dirs, files in os.walk(tmp_path):  # unpacked: the archive's times (2017)
        for name in dirs + files:
            os.utime(os.path.join(folder, name), (1.5e9, 1.5e9))
    first = S3DISDataset(str(tmp_path), "test", release=False)
    second = S3DISDataset(unaligned, "test", release=False)
    assert second.rooms[0].lo[0] == pytest.approx(first.rooms[0].lo[0] + 100, abs=1e-3)


def test_eval_of_the_training_split_scores_every_point_of_its_rooms_once(rooms_root, tmp_path):
    """eval.py --split train: S3DIS's training split is random crops (a sample of its points,
    small rooms padded with repeats); scored, it is read as val and test are, whole rooms
    voted, so the confusion counts each training point once."""
    from lib.checkpoint import save_checkpoint
    from lib.experiment import dataset_meta, evaluate_checkpoint, load_split, model_kwargs
    from models import build_model
    train = load_split("synthetic_rooms", rooms_root, "train", 512)
    torch.manual_seed(0)
    model = build_model("pt_semseg_tiny", **model_kwargs("pt_semseg_tiny", train)).eval()
    meta = {"model": {"name": "pt_semseg_tiny", "kwargs": model_kwargs("pt_semseg_tiny", train)},
            "dataset": dataset_meta("synthetic_rooms", rooms_root, train, 512), "args": {},
            "quant": None}
    ckpt = str(tmp_path / "best.pt")
    save_checkpoint(ckpt, model, meta)
    _, results = evaluate_checkpoint(ckpt, split="train", batch_size=8)
    points = sum(len(room.label) for room in train.rooms)
    assert np.sum(results["confusion"]) == points
