"""ShapeNet part's v0 and hdf5 forms: written from a synthetic v0_normal folder, read back with
the same points and labels, trained on with the same metrics, and bad files refused in one
line naming the file."""
import shutil

import h5py
import numpy as np
import pytest
import torch

from lib.data import synthetic
from lib.data.shapenet_part import ShapeNetPartDataset
from lib.data.synthetic_layouts import parts_as
from lib.experiment import make_loader, model_kwargs
from lib.tasks import model_inputs, supervised_loss
from lib.train import evaluate
from models import build_model

POINTS = 2048  # what the converted forms keep of each shape (the hdf5 release's size)


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    synthetic.write_parts(root / "v0_normal", seed=0, train_shapes=4, eval_shapes=2)
    for layout in ("v0", "hdf5"):
        parts_as(root / "v0_normal", root / layout, layout, points=POINTS)
    return root


@pytest.mark.parametrize("layout", ["v0", "hdf5"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_form_reads_back_the_same_points_and_labels(forms, layout, split, capsys):
    source = ShapeNetPartDataset(forms / "v0_normal", split)
    other = ShapeNetPartDataset(forms / layout, split)
    assert f"[shapenet_part] {forms / layout}: " in capsys.readouterr().out  # the layout, named
    assert other.layout == layout and other.features == "xyz" and source.features == "normals"
    assert other.category_names == source.category_names
    assert other.part_ranges == source.part_ranges and other.class_names == source.class_names
    assert other.categories.tolist() == source.categories.tolist() and len(other) > 0
    for i in range(len(source)):
        start, stop = other.offsets[i], other.offsets[i + 1]
        first = source.offsets[i]
        assert stop - start == POINTS
        np.testing.assert_array_equal(other.points[start:stop], source.points[first:first + POINTS, :3])
        np.testing.assert_array_equal(other.labels[start:stop], source.labels[first:first + POINTS])
    sample = other[0]
    assert torch.equal(sample["feat"], sample["xyz"])  # no normals: xyz are the features


def test_v0_labels_are_numbered_from_one_within_the_category(forms):
    data = ShapeNetPartDataset(forms / "v0", "train")
    synset, shape_id = data.shape_ids[0].split("/")
    seg = np.loadtxt(forms / "v0" / synset / "points_label" / f"{shape_id}.seg")
    start, stop = data.part_ranges[data.categories[0]]
    assert seg.min() >= 1 and seg.max() <= stop - start
    np.testing.assert_array_equal(seg + start - 1, data.labels[:data.offsets[1]])


def train_and_score(root, epochs=2):
    """A few seeded steps of the tiny part model, then its test metrics."""
    torch.manual_seed(0)
    train = ShapeNetPartDataset(root, "train", num_points=128, augment=True)
    test = ShapeNetPartDataset(root, "test", num_points=128)
    model = build_model("pt_seg_tiny", **model_kwargs("pt_seg_tiny", train))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(epochs):
        model.train()
        for batch in make_loader(train, 8, train=True, seed=epoch):
            loss = supervised_loss(model(*model_inputs(batch, "partseg")), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return evaluate(model, make_loader(test, 8, train=False), torch.device("cpu"))


def test_the_same_shapes_through_two_forms_give_the_same_metrics(forms):
    via_v0, via_hdf5 = train_and_score(forms / "v0"), train_and_score(forms / "hdf5")
    assert via_v0["ins_miou"] > 0 and via_v0 == via_hdf5


def test_trainval_is_train_then_val(forms):
    for layout in ("v0_normal", "v0", "hdf5"):
        train, val = (ShapeNetPartDataset(forms / layout, s) for s in ("train", "val"))
        both = ShapeNetPartDataset(forms / layout, "trainval")
        assert both.shape_ids == train.shape_ids + val.shape_ids


def test_h5_folder_is_found_inside_its_parent(forms, tmp_path):
    shutil.copytree(forms / "hdf5", tmp_path / "hdf5_data")  # as the zip unpacks
    assert len(ShapeNetPartDataset(tmp_path, "test")) == len(ShapeNetPartDataset(forms / "hdf5", "test"))


def test_unknown_folder_names_the_supported_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ShapeNet part layout found.*v0_normal.*"
                                                "points_label.*ply_data"):
        ShapeNetPartDataset(tmp_path, "train")


@pytest.mark.parametrize("layout, inner", [
    ("v0_normal", "raw"),  # PyG's ShapeNet keeps the release in <root>/raw/
    ("v0", "shapenetcore_partanno_segmentation_benchmark_v0"),  # unpacked into its own name
    ("hdf5", "shapenet_part_seg_hdf5_data")])
def test_a_form_one_folder_down_is_named_with_the_data_root_to_give(forms, tmp_path, layout, inner):
    shutil.copytree(forms / layout, tmp_path / "outer" / inner)
    with pytest.raises(FileNotFoundError) as err:
        ShapeNetPartDataset(tmp_path / "outer", "train")
    assert f"its subfolder {inner}/ does" in one_line(err)
    assert f"give --data-root {tmp_path / 'outer' / inner}" in str(err.value)


def copy_form(forms, layout, tmp_path):
    return shutil.copytree(forms / layout, tmp_path / layout)


def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda seg: "0\n" + seg.split("\n", 1)[1], r"\.seg: line 1: label 0 is not a part of \w+ \(1\.\.\d\)"),
    (lambda seg: "9\n" + seg.split("\n", 1)[1], r"\.seg: line 1: label 9 is not a part"),
    (lambda seg: seg + "1\n", r"\.seg: 2049 labels for the 2048 points"),
    (lambda seg: seg.replace("\n", " 1\n", 1), r"\.seg: line 1: expected 1 columns, found 2"),
])
def test_bad_v0_label_file_is_named(forms, tmp_path, edit, message):
    root = copy_form(forms, "v0", tmp_path)
    seg = next(root.glob("*/points_label/*.seg"))
    seg.write_text(edit(seg.read_text()))
    with pytest.raises(ValueError, match=message) as err:
        for split in ("train", "val", "test"):
            ShapeNetPartDataset(root, split)
    assert seg.name in one_line(err)


def test_v0_points_without_labels_is_named(forms, tmp_path):
    root = copy_form(forms, "v0", tmp_path)
    seg = next(root.glob("*/points_label/*.seg"))
    seg.unlink()
    with pytest.raises(ValueError, match=rf"{seg.name}: missing"):
        for split in ("train", "val", "test"):
            ShapeNetPartDataset(root, split)


def rewrite_h5(path, **changes):
    with h5py.File(path, "r") as f:
        arrays = {key: f[key][:] for key in f}
    for key, change in changes.items():
        arrays[key] = change(arrays[key])
    path.unlink()
    with h5py.File(path, "w") as f:
        for key, array in arrays.items():
            if array is not None:
                f.create_dataset(key, data=array)


def set_first(value):
    def change(array):
        array.reshape(-1)[0] = value
        return array
    return change


@pytest.mark.parametrize("changes, message", [
    (dict(pid=set_first(49)), r"shape 0, point 0: part id 49 is not a part of"),
    (dict(label=set_first(30)), r"shape 0: category 30 is not an integer in 0\.\.5"),
    (dict(label=lambda a: set_first(1.5)(a.astype(np.float64))),
     r"shape 0: category 1\.5 is not an integer in 0\.\.5"),  # would be category 1
    (dict(pid=lambda a: None), r"not a readable h5 file with data, label and pid"),
    (dict(pid=lambda a: a[:, :100]), r"expected data \(S, N, 3\), label \(S, 1\) and pid \(S, N\)"),
    (dict(data=lambda a: np.concatenate([a, a], 2)), r"expected data \(S, N, 3\)"),
])
def test_bad_h5_file_is_named(forms, tmp_path, changes, message):
    root = copy_form(forms, "hdf5", tmp_path)
    rewrite_h5(root / "ply_data_train0.h5", **changes)
    with pytest.raises(ValueError, match=r"ply_data_train0\.h5: " + message) as err:
        ShapeNetPartDataset(root, "train")
    one_line(err)


def test_h5_file_with_a_group_in_place_of_an_array_is_named(forms, tmp_path):
    root = copy_form(forms, "hdf5", tmp_path)
    rewrite_h5(root / "ply_data_train0.h5", pid=lambda a: None)
    with h5py.File(root / "ply_data_train0.h5", "a") as f:
        f.create_group("pid")
    with pytest.raises(ValueError, match=r"ply_data_train0\.h5: not a readable h5 file") as err:
        ShapeNetPartDataset(root, "train")
    one_line(err)


def test_truncated_h5_file_is_named(forms, tmp_path):
    root = copy_form(forms, "hdf5", tmp_path)
    path = root / "ply_data_test0.h5"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"ply_data_test0\.h5: not a readable h5 file") as err:
        ShapeNetPartDataset(root, "test")
    one_line(err)


def test_missing_h5_files_are_counted_and_none_present_is_an_error(forms, tmp_path, capsys):
    root = copy_form(forms, "hdf5", tmp_path)
    (root / "train_hdf5_file_list.txt").write_text("ply_data_train0.h5\nply_data_train1.h5\n")
    assert len(ShapeNetPartDataset(root, "train")) == 24
    assert "1 of 2 h5 files of the train split are missing" in capsys.readouterr().out
    (root / "ply_data_val0.h5").unlink()
    with pytest.raises(FileNotFoundError, match="none of the 1 h5 files of the val split"):
        ShapeNetPartDataset(root, "val")
