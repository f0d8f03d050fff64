"""ShapeNet part reader on fixtures written in the release's exact layout."""
import json

import numpy as np
import pytest
import torch

from lib.data import build_dataset
from lib.data.shapenet_part import ShapeNetPartDataset
from lib.data.transforms import augment, set_epoch

CATEGORIES = [("Airplane", "02691156"), ("Skateboard", "04225987"), ("Table", "04379243")]


def shape_table(rng, n, labels):
    """A release-style table: x y z nx ny nz label, labels cycled over `labels`."""
    xyz = rng.uniform(-0.5, 0.5, (n, 3))
    normals = rng.standard_normal((n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return np.column_stack([xyz, normals, np.resize(labels, n)])


def write_root(root, splits, tables, part_ranges=None):
    """splits: {split: [(synset, id)]}; tables: {(synset, id): table} (absent = missing file)."""
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text(
        "".join(f"{name}\t{synset}\n" for name, synset in CATEGORIES))
    for split, entries in splits.items():
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(
            json.dumps([f"shape_data/{synset}/{shape_id}" for synset, shape_id in entries]))
    for (synset, shape_id), table in tables.items():
        (root / synset).mkdir(exist_ok=True)
        np.savetxt(root / synset / f"{shape_id}.txt", table, fmt="%.6f")
    if part_ranges is not None:
        (root / "part_ranges.json").write_text(json.dumps(part_ranges))
    return root


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    tables = {("04379243", "table_a"): shape_table(rng, 300, [47, 48, 48, 49]),
              ("04225987", "board-b"): shape_table(rng, 250, [44, 45, 46]),
              ("02691156", "plane_c"): shape_table(rng, 280, [0, 1, 2, 3]),
              ("04379243", "table_d"): shape_table(rng, 100, [47])}
    splits = {"train": [("04379243", "table_a"), ("04225987", "board-b"), ("02691156", "plane_c")],
              "val": [("04379243", "table_d")],
              # table_a is listed twice, like the 35 shapes the official lists share
              "test": [("04379243", "table_a"), ("04379243", "table_d")]}
    return write_root(tmp_path / "shapenet", splits, tables)


def test_labels_categories_and_label_space(root):
    data = ShapeNetPartDataset(root, "train", num_points=300)
    assert data.task == "partseg" and data.in_channels == 3
    assert data.category_names == ["Airplane", "Skateboard", "Table"]
    assert data.part_ranges == [(0, 4), (44, 47), (47, 50)]  # the official global ids
    assert data.num_classes == 50 and len(data.class_names) == 50
    assert data.shape_ids == ["04379243/table_a", "04225987/board-b", "02691156/plane_c"]
    sample = data[0]
    assert int(sample["category"]) == 2
    assert sample["xyz"].shape == (300, 3) and sample["feat"].shape == (300, 3)
    assert sample["label"].dtype == torch.int64
    # N equals the file's length, so the sample is a permutation of the whole shape
    assert torch.bincount(sample["label"], minlength=50)[47:50].tolist() == [75, 150, 75]
    assert sample["xyz"].mean(0).abs().max() < 1e-5
    assert sample["xyz"].norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    assert sample["feat"].norm(dim=1).numpy() == pytest.approx(1.0, abs=1e-5)
    assert set(data[2]["label"].tolist()) == {0, 1, 2, 3} and int(data[2]["category"]) == 0


def test_split_is_keyed_by_its_list_file(root):
    train = ShapeNetPartDataset(root, "train")
    test = ShapeNetPartDataset(root, "test")
    val = ShapeNetPartDataset(root, "val")
    assert "04379243/table_a" in train.shape_ids and "04379243/table_a" in test.shape_ids
    assert test.shape_ids == ["04379243/table_a", "04379243/table_d"]
    assert val.shape_ids == ["04379243/table_d"]


def test_missing_entries_are_counted_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(1)
    entries = [("04379243", f"t{k}") for k in range(5)]
    write_root(tmp_path, {"train": entries}, {entries[1]: shape_table(rng, 50, [47])})
    data = ShapeNetPartDataset(tmp_path, "train")
    assert len(data) == 1
    layout, missing = capsys.readouterr().out.strip().splitlines()  # the layout found, then the count
    assert "v0_normal" in layout and "4 of 5" in missing


def test_only_the_main_process_says_what_the_reader_found(tmp_path, capsys, monkeypatch):
    """Under torchrun every process reads the data: the layout and the missing entries were
    said once by each."""
    rng = np.random.default_rng(1)
    entries = [("04379243", f"t{k}") for k in range(5)]
    write_root(tmp_path, {"train": entries}, {entries[1]: shape_table(rng, 50, [47])})
    monkeypatch.setenv("RANK", "1")
    assert len(ShapeNetPartDataset(tmp_path, "train")) == 1
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    ShapeNetPartDataset(tmp_path, "train")
    assert capsys.readouterr().out.count("[shapenet_part]") == 2


def test_no_listed_file_present_is_an_error(tmp_path):
    write_root(tmp_path, {"train": [("04379243", "gone")]}, {})
    with pytest.raises(FileNotFoundError, match="none of the 1 shapes"):
        ShapeNetPartDataset(tmp_path, "train")


@pytest.mark.parametrize("bad_line, message", [
    ("0.1 0.2 abc 0 0 1 47", "line 3: not a number"),
    ("0.1 0.2 0.3 0 0 1", "line 3: expected 7 columns, found 6"),
    ("0.1 0.2 0.3 0 0 1 47 5", "line 3: expected 7 columns, found 8"),
    ("0.1 nan 0.3 0 0 1 47", "line 3: NaN"),
    ("0.1 0.2 0.3 0 0 1 12", r"line 3: label 12 is not a part of Table \(47..49\)"),
    ("0.1 0.2 0.3 0 0 1 47.5", "line 3: label 47.5 is not a part of Table"),
])
def test_bad_line_names_file_and_line(tmp_path, bad_line, message):
    write_root(tmp_path, {"train": [("04379243", "bad")]}, {})
    (tmp_path / "04379243").mkdir()
    good = "0.1 0.2 0.3 0.0 0.0 1.0 48.000000\n"
    (tmp_path / "04379243" / "bad.txt").write_text(good * 2 + bad_line + "\n" + good)
    with pytest.raises(ValueError, match=r"bad\.txt: " + message):
        ShapeNetPartDataset(tmp_path, "train")


def test_empty_file_is_an_error(tmp_path):
    write_root(tmp_path, {"train": [("04379243", "empty")]}, {})
    (tmp_path / "04379243").mkdir()
    (tmp_path / "04379243" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt: the file holds no points"):
        ShapeNetPartDataset(tmp_path, "train")


def test_split_entry_with_unknown_synset_is_an_error(tmp_path):
    write_root(tmp_path, {"train": [("99999999", "x")]}, {})
    with pytest.raises(ValueError, match="synset 99999999 is not in synsetoffset2category"):
        ShapeNetPartDataset(tmp_path, "train")


def test_part_ranges_json_replaces_the_official_table(tmp_path):
    rng = np.random.default_rng(2)
    ranges = {"Airplane": {"range": [0, 2], "parts": ["body", "wing"]},
              "Skateboard": {"range": [2, 3], "parts": ["deck"]},
              "Table": {"range": [3, 5], "parts": ["top", "legs"]}}
    write_root(tmp_path, {"train": [("04379243", "t")]},
               {("04379243", "t"): shape_table(rng, 40, [3, 4])}, ranges)
    data = ShapeNetPartDataset(tmp_path, "train", num_points=40)
    assert data.part_ranges == [(0, 2), (2, 3), (3, 5)]
    assert data.class_names == ["body", "wing", "deck", "top", "legs"]
    assert set(data[0]["label"].tolist()) == {3, 4}


def test_sampling_is_seeded_for_evaluation_and_random_for_training(root):
    evaluation = ShapeNetPartDataset(root, "test", num_points=2048)
    assert evaluation[1]["xyz"].shape == (2048, 3)  # 100 points, drawn with replacement
    assert torch.equal(evaluation[0]["xyz"], evaluation[0]["xyz"])
    assert not torch.equal(evaluation[0]["xyz"],
                           ShapeNetPartDataset(root, "test", 2048, seed=1)[0]["xyz"])
    training = ShapeNetPartDataset(root, "train", num_points=64, augment=True)
    first = training[0]
    assert first["feat"].norm(dim=1).numpy() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(training[0]["xyz"], first["xyz"])  # keyed by (seed, epoch, sample)...
    set_epoch(training, 1)
    assert not torch.equal(training[0]["xyz"], first["xyz"])  # ...so a new epoch draws anew


def test_training_draws_do_not_depend_on_workers_or_processes(root):
    """Two DataLoader workers (or two DDP ranks: both are other processes with their own torch
    RNG) read every sample exactly as one process does, epoch after epoch."""
    training = ShapeNetPartDataset(root, "train", num_points=64, augment=True)
    order = [0, 1, 2, 1]

    def epoch_batches(epoch, workers):
        set_epoch(training, epoch)
        loader = torch.utils.data.DataLoader(training, batch_size=1, sampler=order,
                                             num_workers=workers)
        return [batch["xyz"] for batch in loader]

    for epoch in (0, 1):
        torch.manual_seed(epoch)  # the workers' torch seeds differ from the main process's
        alone = epoch_batches(epoch, 0)
        assert all(torch.equal(a, b) for a, b in zip(alone, epoch_batches(epoch, 2)))
        assert torch.equal(alone[1], alone[3])
    assert not torch.equal(epoch_batches(0, 0)[0], epoch_batches(1, 0)[0])


def test_augmentation_keeps_normals_perpendicular_and_stays_in_range():
    rng = np.random.default_rng(0)
    plane = rng.standard_normal((200, 2)) @ np.array([[1.0, -1, 0], [0, 1, -1]])  # x + y + z = 0
    plane -= plane.mean(0)
    normals = np.tile(np.ones(3) / np.sqrt(3), (200, 1))
    for _ in range(20):
        xyz, moved = augment(plane, normals, rng, scale=(0.8, 1.25), shift=0.1)
        shift = xyz.mean(0)  # the plane's points are centred, so the mean is the shift
        assert np.abs(shift).max() <= 0.1
        scale = (xyz - shift)[:, 0] / plane[:, 0]
        assert 0.8 <= scale[0] <= 1.25 and np.allclose(scale, scale[0])
        # An anisotropic scale tilts the plane; its normal must follow (inverse transpose).
        assert np.abs(((xyz - xyz[0]) * moved).sum(1)).max() < 1e-9
        assert np.allclose(np.linalg.norm(moved, axis=1), 1)


def test_build_dataset_points_to_the_download_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="shapenetcore_partanno_segmentation_benchmark_v0_normal.zip"):
        build_dataset("shapenet_part", tmp_path / "absent", "train")
    assert len(build_dataset("shapenet_part", write_root(
        tmp_path / "r", {"val": [("04379243", "t")]},
        {("04379243", "t"): shape_table(np.random.default_rng(3), 30, [48])}), "val")) == 1


@pytest.mark.parametrize("extra, message", [
    ("Table\t04379243\n", r"line 4: category Table is listed twice"),
    ("Desk\t04379243\n", r"line 4: synset 04379243 is listed twice"),
])
def test_a_category_listed_twice_is_an_error(root, extra, message):
    """A second Table would shadow the first in the per-category table and cat. mIoU."""
    with open(root / "synsetoffset2category.txt", "a") as f:
        f.write(extra)
    with pytest.raises(ValueError, match=rf"synsetoffset2category\.txt: {message}"):
        ShapeNetPartDataset(root, "train")


@pytest.mark.parametrize("content", ["5", '"shape_data/04379243/table_a"', '{"a": 1}'])
def test_a_split_list_that_is_not_a_list_is_one_line(root, content):
    (root / "train_test_split" / "shuffled_train_file_list.json").write_text(content)
    with pytest.raises(ValueError, match=r"shuffled_train_file_list\.json: not a JSON list \(a "):
        ShapeNetPartDataset(root, "train")


@pytest.mark.parametrize("name", ["synsetoffset2category.txt",
                                  "train_test_split/shuffled_train_file_list.json"])
def test_a_list_file_that_is_not_utf8_names_the_file_and_line(root, name):
    path = root / name
    path.write_bytes(path.read_bytes() + b"\n\xe9\n")
    with pytest.raises(ValueError, match=rf"{path.name}: line \d+: not UTF-8 text"):
        ShapeNetPartDataset(root, "train")
