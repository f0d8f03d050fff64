"""Synthetic generator: geometry of the surfaces, determinism, and that its output is read by the
real readers."""
import functools
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lib.data import build_dataset, synthetic, synthetic_shapes
from lib.data.modelnet40 import ModelNet40Dataset
from lib.data.shapenet_part import ShapeNetPartDataset

SMALL = dict(train_shapes=4, eval_shapes=2)


def folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def parts_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "parts"
    baseline = synthetic.write_parts(root, seed=0, **SMALL)
    return root, baseline


@pytest.mark.parametrize("surfaces, centre", [
    (synthetic_shapes.box(1.0, 2.0, 0.5), (0, 0, 0)),
    (synthetic_shapes.frustum(0.5, 0.2, 1.0), (0, 0.5, 0)),
    (synthetic_shapes.frustum(0.4, 0.0, 0.8), (0, 0.3, 0)),
    (synthetic_shapes.ellipsoid(1.0, 0.3, 0.5), (0, 0, 0)),
])
def test_surface_normals_are_unit_and_outward(surfaces, centre):
    rng = np.random.default_rng(0)
    for surface in surfaces:
        points, normals = surface.sample(rng, 500)
        assert np.allclose(np.linalg.norm(normals, axis=1), 1)
        assert (((points - centre) * normals).sum(1) > 0).all()


def test_torus_points_lie_on_the_tube_with_radial_normals():
    points, normals = synthetic_shapes.torus(1.0, 0.2)[0].sample(np.random.default_rng(0), 4000)
    tube_centre = points - 0.2 * normals
    assert np.allclose(np.hypot(tube_centre[:, 0], tube_centre[:, 1]), 1.0)
    assert np.allclose(tube_centre[:, 2], 0.0, atol=1e-12)
    # Area-uniform: the outer half of the tube (farther from the axis) has more area.
    outer = (np.hypot(points[:, 0], points[:, 1]) > 1.0).mean()
    assert outer == pytest.approx(0.5 + 0.2 / np.pi, abs=0.025)  # integral of (R + r cos v)


def test_sampling_is_area_uniform_across_surfaces():
    rng = np.random.default_rng(0)
    # areas 6 and 1.5 pi
    parts = [synthetic_shapes.box(1.0, 1.0, 1.0), synthetic_shapes.frustum(0.5, 0.5, 1.0)]
    xyz, normals, labels = synthetic_shapes.sample_shape(rng, parts, 20000)
    assert np.mean(labels == 0) == pytest.approx(6 / (6 + 1.5 * np.pi), abs=0.01)
    assert np.abs(xyz).max() <= 1 + 5 * synthetic_shapes.NOISE
    assert np.allclose(np.linalg.norm(normals, axis=1), 1)


def test_parts_layout_loads_through_the_shapenet_reader(parts_root):
    root, _ = parts_root
    train = ShapeNetPartDataset(root, "train")
    assert len(train) == 4 * len(synthetic_shapes.PART_CATEGORIES) >= 6 * 4
    assert len(ShapeNetPartDataset(root, "val")) == len(ShapeNetPartDataset(root, "test")) == 12
    assert train.category_names == list(synthetic_shapes.PART_CATEGORIES)
    stops = [0] + [stop for _, stop in train.part_ranges]
    assert [start for start, _ in train.part_ranges] == stops[:-1]  # contiguous global ids
    assert all(2 <= stop - start <= 4 for start, stop in train.part_ranges)
    assert train.class_names[:4] == ["fuselage", "wings", "tail", "engines"]
    synsets = (root / "synsetoffset2category.txt").read_text().split()[1::2]
    assert all(len(s) == 8 and s.isdigit() for s in synsets)
    sizes = np.diff(train.offsets)
    assert sizes.min() >= synthetic.PART_POINTS[0] and sizes.max() <= synthetic.PART_POINTS[1]
    for i in range(len(train)):  # every category's parts all occur in its training shapes
        start, stop = train.part_ranges[train.categories[i]]
        labels = train.labels[train.offsets[i]:train.offsets[i + 1]]
        assert labels.min() >= start and labels.max() < stop
    for c, (start, stop) in enumerate(train.part_ranges):
        seen = np.concatenate([train.labels[train.offsets[i]:train.offsets[i + 1]]
                               for i in np.flatnonzero(train.categories == c)])
        assert set(seen.tolist()) == set(range(start, stop))


def test_trivial_baseline_is_far_below_a_perfect_score(parts_root):
    _, baseline = parts_root
    assert baseline["num_shapes"] == 12
    assert 0.05 < baseline["ins_miou"] < 0.5
    # A part present in the shape scores its IoU; predicting one part everywhere cannot reach
    # the perfect 1 unless a category has a single part.
    assert max(baseline["per_category"].values()) < 0.7


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, parts_root):
    root, _ = parts_root
    synthetic.write_parts(tmp_path / "again", seed=0, **SMALL)
    synthetic.write_parts(tmp_path / "other", seed=1, **SMALL)
    same, again = folder_bytes(root), folder_bytes(tmp_path / "again")
    other = folder_bytes(tmp_path / "other")
    assert same == again
    assert len(same) == len(other) and same != other
    assert same["synsetoffset2category.txt"] == other["synsetoffset2category.txt"]


def test_cls_layouts_hold_the_same_shapes_and_are_deterministic(tmp_path):
    synthetic.write_cls(tmp_path / "a", seed=0, train_shapes=2, eval_shapes=1)
    synthetic.write_cls(tmp_path / "b", seed=0, train_shapes=2, eval_shapes=1)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    txt = ModelNet40Dataset(tmp_path / "a" / "modelnet40_normal_resampled", "test")
    h5 = ModelNet40Dataset(tmp_path / "a" / "modelnet40_ply_hdf5_2048", "test")
    assert txt.class_names == h5.class_names == list(synthetic_shapes.CLASSES)
    assert txt.num_classes >= 8 and len(txt) == len(h5) == len(synthetic_shapes.CLASSES)
    assert txt.clouds[0].shape == (1024, 6)
    # The h5 file holds the txt files' shapes (xyz only), in shuffled order.
    for cloud, label in zip(txt.clouds, txt.labels):
        match = [i for i, other in enumerate(h5.clouds)
                 if np.allclose(other[:1024], cloud[:, :3], atol=1e-5)]
        assert len(match) == 1 and h5.labels[match[0]] == label
    assert h5.labels.tolist() != sorted(h5.labels.tolist())


def test_build_dataset_generates_missing_synthetic_data_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthetic, "write_parts", functools.partial(synthetic.write_parts, **SMALL))
    monkeypatch.setattr(synthetic, "write_cls",
                        functools.partial(synthetic.write_cls, train_shapes=10, eval_shapes=1))
    parts = build_dataset("synthetic_parts", tmp_path / "parts", "val")
    assert parts.task == "partseg" and len(parts) == 12
    assert "generating synthetic_parts" in capsys.readouterr().out
    build_dataset("synthetic_parts", tmp_path / "parts", "train")
    assert "generating" not in capsys.readouterr().out
    cls = build_dataset("synthetic_cls", tmp_path / "cls" / "modelnet40_ply_hdf5_2048", "val")
    assert cls.layout == "hdf5" and len(cls) == len(synthetic_shapes.CLASSES)  # every 10th of 100
    assert (tmp_path / "cls" / "modelnet40_normal_resampled" / "modelnet40_train.txt").is_file()
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary folder became the dataset


def test_build_dataset_generates_rooms_where_the_s3dis_reader_looks(tmp_path, monkeypatch):
    """Wiring only: the rooms writer and the S3DIS reader belong to lib/data/s3dis*.py."""
    written, opened = [], []
    monkeypatch.setattr(synthetic, "write_rooms", lambda out, seed: written.append(Path(out)))
    fake_reader = types.ModuleType("lib.data.s3dis")
    fake_reader.S3DISDataset = lambda root, **kwargs: opened.append((Path(root), kwargs))
    monkeypatch.setitem(sys.modules, "lib.data.s3dis", fake_reader)
    build_dataset("synthetic_rooms", tmp_path / "rooms", "test", num_points=4096)
    assert opened == [(tmp_path / "rooms", dict(split="test", augment=False, seed=0,
                                                 num_points=4096, release=False,
                                                 whole_rooms=False))]
    assert len(written) == 1 and written[0].parent == tmp_path  # a temporary sibling, renamed
    assert (tmp_path / "rooms").is_dir()


def test_command_line_replaces_the_output(tmp_path):
    args = synthetic.get_args_parser().parse_args(
        ["--out", str(tmp_path), "--only", "parts", "--train-shapes", "1", "--eval-shapes", "1"])
    synthetic.main(args)
    (tmp_path / "parts" / "stale.txt").write_text("left over")
    synthetic.main(args)
    assert not (tmp_path / "parts" / "stale.txt").exists()
    test_split = ShapeNetPartDataset(tmp_path / "parts", "test")
    assert len(test_split) == len(synthetic_shapes.PART_CATEGORIES)


def test_command_line_writes_the_other_forms_on_request_only(tmp_path):
    args = synthetic.get_args_parser().parse_args(
        ["--out", str(tmp_path), "--only", "parts_hdf5", "cls_off", "--train-shapes", "1",
         "--eval-shapes", "1"])
    synthetic.main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls_off", "parts_hdf5"]
    assert not (tmp_path / "parts_hdf5" / "_source").exists()  # the scratch source is gone
    h5 = ShapeNetPartDataset(tmp_path / "parts_hdf5", "test")
    assert h5.layout == "hdf5" and len(h5) == len(synthetic_shapes.PART_CATEGORIES)
    meshes = ModelNet40Dataset(tmp_path / "cls_off", "test")
    assert meshes.layout == "off" and len(meshes) == len(meshes.class_names)
    assert synthetic.get_args_parser().parse_args([]).only == ["parts", "cls", "rooms"]
