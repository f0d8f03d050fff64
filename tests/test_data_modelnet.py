"""ModelNet40 reader on fixtures in both released layouts."""
import h5py
import numpy as np
import pytest
import torch

from lib.data import build_dataset
from lib.data.modelnet40 import ModelNet40Dataset
from lib.data.transforms import set_epoch

NAMES = ["airplane", "chair", "night_stand"]  # night_stand: a class name with an underscore


def cloud(rng, n, tag):
    """n points with normals; the first point's x holds `tag`, to identify the shape later."""
    xyz = rng.uniform(-1, 1, (n, 3))
    xyz[0] = (tag, 0, 0)
    normals = rng.standard_normal((n, 3))
    return np.column_stack([xyz, normals / np.linalg.norm(normals, axis=1, keepdims=True)])


def write_txt_layout(root, train, test, lines=1100, skip=()):
    """train/test: lists of (class, number); entries in `skip` get no file."""
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("".join(f"{n}\n" for n in NAMES))
    rng = np.random.default_rng(0)
    for split, entries in (("train", train), ("test", test)):
        names = [f"{name}_{number:04d}" for name, number in entries]
        (root / f"modelnet40_{split}.txt").write_text("".join(f"{e}\n" for e in names))
        for (name, number), entry in zip(entries, names):
            if entry in skip:
                continue
            (root / name).mkdir(exist_ok=True)
            np.savetxt(root / name / f"{entry}.txt", cloud(rng, lines, number), fmt="%.6f",
                       delimiter=",")
    return root


def write_h5_layout(root, files, test_files=()):
    """files: [(name, data (S, 2048, 3), label (S, 1))] for training; listed as in the release."""
    root.mkdir(parents=True)
    (root / "shape_names.txt").write_text("".join(f"{n}\n" for n in NAMES))
    for split, entries in (("train", files), ("test", test_files)):
        (root / f"{split}_files.txt").write_text(
            "".join(f"data/modelnet40_ply_hdf5_2048/{name}\n" for name, _, _ in entries))
        for name, data, label in entries:
            if data is not None:
                with h5py.File(root / name, "w") as f:
                    f.create_dataset("data", data=data)
                    f.create_dataset("label", data=label)
    return root


def h5_arrays(first_tag, count, labels=None):
    rng = np.random.default_rng(first_tag)
    data = rng.uniform(-1, 1, (count, 2048, 3)).astype(np.float32)
    data[:, 0, 0] = np.arange(first_tag, first_tag + count)
    labels = np.arange(count) % len(NAMES) if labels is None else labels
    return data, np.asarray(labels, dtype=np.uint8).reshape(-1, 1)


@pytest.fixture
def txt_root(tmp_path):
    train = [(NAMES[k % 3], k + 1) for k in range(30)]
    test = [("night_stand", 101), ("chair", 102)]
    return write_txt_layout(tmp_path / "modelnet40_normal_resampled", train, test)


def tags(data):
    """The tag of every shape in a split, read back through the raw clouds."""
    return sorted(int(round(float(c[0, 0]))) for c in data.clouds)


def test_normal_resampled_labels_normals_and_first_points(txt_root):
    data = ModelNet40Dataset(txt_root, "test", num_points=1024)
    assert data.layout == "normal_resampled" and data.class_names == NAMES
    assert data.task == "cls" and data.num_classes == 3 and data.in_channels == 3
    assert data.labels.tolist() == [2, 1]  # night_stand_0101, chair_0102
    sample = data[0]
    assert sample["xyz"].shape == (1024, 3) and sample["label"].dtype == torch.int64
    assert sample["xyz"].norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    raw = np.loadtxt(txt_root / "night_stand" / "night_stand_0101.txt", delimiter=",")
    assert np.allclose(sample["feat"].numpy(), raw[:1024, 3:], atol=1e-5)  # normals, first N
    assert data.clouds[0].shape == (1024, 6)  # only the first N lines are read


def test_val_is_a_fixed_tenth_of_train_and_disjoint_from_it(txt_root):
    train = ModelNet40Dataset(txt_root, "train")
    val = ModelNet40Dataset(txt_root, "val")
    assert tags(val) == [10, 20, 30]  # every 10th list entry
    assert set(tags(train)).isdisjoint(tags(val))
    assert sorted(tags(train) + tags(val)) == list(range(1, 31))


def test_val_slice_does_not_move_when_files_are_missing(tmp_path, capsys):
    train = [("chair", k + 1) for k in range(20)]
    root = write_txt_layout(tmp_path / "m", train, [("chair", 99)],
                            skip={"chair_0002", "chair_0003", "chair_0099"})
    assert tags(ModelNet40Dataset(root, "val")) == [10, 20]
    layout, missing = capsys.readouterr().out.strip().splitlines()  # the layout, then the count
    assert "normal_resampled" in layout and "2 of 20 listed shape files are missing" in missing
    with pytest.raises(FileNotFoundError, match="none of the 1 listed shape files"):
        ModelNet40Dataset(root, "test")


def test_a_partial_download_without_the_val_entries_validates_on_a_tenth_of_train(tmp_path,
                                                                                 capsys):
    """None of the every-10th entries present (three genuine files of the release, say): "val"
    was empty and training could not start; now a fixed tenth of the present shapes validates,
    and training leaves it out."""
    train = [("chair", k + 1) for k in range(30)]
    present = {1, 2, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15}  # no 10th, 20th or 30th entry
    root = write_txt_layout(tmp_path / "m", train, [("chair", 99)],
                            skip={f"chair_{k:04d}" for k in range(1, 31) if k not in present})
    val, fit = ModelNet40Dataset(root, "val"), ModelNet40Dataset(root, "train")
    assert len(tags(val)) == 1 and set(tags(val)) | set(tags(fit)) == present
    assert set(tags(val)).isdisjoint(tags(fit))
    assert tags(ModelNet40Dataset(root, "val")) == tags(val)  # fixed
    assert "val is a fixed tenth of the 12 present training shapes" in capsys.readouterr().out


def test_short_file_is_topped_up_with_replacement(tmp_path):
    root = write_txt_layout(tmp_path / "m", [("chair", 1)], [("chair", 2)], lines=100)
    sample = ModelNet40Dataset(root, "test", num_points=512)[0]
    assert sample["xyz"].shape == (512, 3)
    assert len(np.unique(sample["xyz"].numpy(), axis=0)) <= 100


@pytest.mark.parametrize("bad_line, message", [
    ("0.1,0.2,0.3,0,0", "line 2: expected 6 columns, found 5"),
    ("0.1 0.2 0.3 0 0 1", "line 2: expected 6 columns, found 1"),
    ("0.1,nan,0.3,0,0,1", "line 2: NaN"),
    ("0.1,0.2,x,0,0,1", "line 2: not a number"),
])
def test_bad_line_names_file_and_line(tmp_path, bad_line, message):
    root = write_txt_layout(tmp_path / "m", [], [("chair", 1)], skip={"chair_0001"})
    (root / "chair").mkdir()
    (root / "chair" / "chair_0001.txt").write_text(f"0,0,0,0,0,1\n{bad_line}\n0,0,0,0,0,1\n")
    with pytest.raises(ValueError, match=r"chair_0001\.txt: " + message):
        ModelNet40Dataset(root, "test")


def test_list_entry_of_unknown_class_is_an_error(tmp_path):
    root = write_txt_layout(tmp_path / "m", [], [("chair", 1)])
    (root / "modelnet40_test.txt").write_text("chair_0001\nsofa_0002\n")
    with pytest.raises(ValueError, match=r"modelnet40_test\.txt: entry 'sofa_0002'"):
        ModelNet40Dataset(root, "test")


def test_hdf5_layout_resolves_listed_paths_by_basename(tmp_path):
    root = write_h5_layout(tmp_path / "modelnet40_ply_hdf5_2048",
                           [("ply_data_train0.h5", *h5_arrays(0, 12)),
                            ("ply_data_train1.h5", *h5_arrays(12, 8))],
                           [("ply_data_test0.h5", *h5_arrays(100, 3, labels=[2, 0, 1]))])
    test = ModelNet40Dataset(root, "test")
    assert test.layout == "hdf5" and test.class_names == NAMES
    assert test.labels.tolist() == [2, 0, 1]
    sample = test[0]
    assert sample["xyz"].shape == (1024, 3)
    assert torch.equal(sample["feat"], sample["xyz"])  # no normals in this layout
    train, val = ModelNet40Dataset(root, "train"), ModelNet40Dataset(root, "val")
    assert tags(val) == [9, 19] and sorted(tags(train) + tags(val)) == list(range(20))


@pytest.mark.parametrize("split, listed", [("train", "train_files"), ("val", "train_files"),
                                           ("test", "test_files")])
def test_hdf5_listed_file_missing_is_an_error_naming_it(tmp_path, split, listed):
    """A shape's position counts the shapes of the files listed before it: read without its
    middle file (shapes 12-19), "val" was shapes 9 and 27 where the three files make it 9, 19
    and 29, and the run went on with a count of the missing files."""
    root = write_h5_layout(tmp_path / "h", [("ply_data_train0.h5", *h5_arrays(0, 12)),
                                            ("ply_data_train1.h5", None, None),
                                            ("ply_data_train2.h5", *h5_arrays(20, 15))],
                           [("ply_data_test0.h5", None, None),
                            ("ply_data_test1.h5", *h5_arrays(100, 3))])
    missing = "ply_data_train1" if listed == "train_files" else "ply_data_test0"
    with pytest.raises(FileNotFoundError, match=rf"{listed}\.txt: lists {missing}\.h5, missing "
                                                rf"from .* \(1 of [23] h5 files") as err:
        ModelNet40Dataset(root, split)
    assert "\n" not in str(err.value)


def test_data_check_fails_on_a_missing_listed_file(tmp_path, capsys):
    """python -m lib.data as a scripted check: a listed h5 file gone is a failing status (it was
    a FileNotFoundError, which the check takes for a split absent by choice), while a test
    split absent altogether is not."""
    from lib.data.__main__ import main as check_data
    test = [("ply_data_test0.h5", *h5_arrays(100, 3)), ("ply_data_test1.h5", *h5_arrays(103, 3))]
    root = write_h5_layout(tmp_path / "h", [("ply_data_train0.h5", *h5_arrays(0, 12))], test)
    args = type("Args", (), dict(dataset="modelnet40", data_root=str(root), num_points=None))
    check_data(args)  # every split readable
    (root / "ply_data_test1.h5").unlink()
    with pytest.raises(SystemExit, match="the test split stopped at a problem"):
        check_data(args)
    assert "lists ply_data_test1.h5, missing" in capsys.readouterr().out
    (root / "ply_data_test0.h5").unlink()
    check_data(args)  # none of the test split's files: absent, not damaged; the check passes
    assert "test_files.txt: none of the 2 listed h5 files exists" in capsys.readouterr().out
    (root / "test_files.txt").unlink()
    check_data(args)  # nor its list


@pytest.mark.parametrize("label, nan, message", [
    (3, False, r"sample 1: label 3 is not an integer in 0\.\.2"),
    (-1, False, r"sample 1: label -1 is not an integer"),  # would index the last class
    (1.5, False, r"sample 1: label 1\.5 is not an integer"),  # would be class 1
    (0, True, "sample 1: NaN coordinates"),
])
def test_hdf5_bad_sample_names_file_and_index(tmp_path, label, nan, message):
    data, labels = h5_arrays(0, 3)
    labels = labels.astype(np.float64)  # re-exported files: any numeric type
    labels[1] = label
    data[1, 5, 2] = np.nan if nan else data[1, 5, 2]
    root = write_h5_layout(tmp_path / "h", [], [("ply_data_test0.h5", data, labels)])
    with pytest.raises(ValueError, match=r"ply_data_test0\.h5: " + message):
        ModelNet40Dataset(root, "test")


@pytest.mark.parametrize("write_data", [
    lambda f: f.create_group("data"),  # a group where the array should be
    lambda f: f.create_dataset("data", data=np.zeros(6, np.float32)),  # 1-D
])
def test_hdf5_file_of_another_structure_is_named(tmp_path, write_data):
    root = write_h5_layout(tmp_path / "h", [], [("ply_data_test0.h5", None, None)])
    with h5py.File(root / "ply_data_test0.h5", "w") as f:
        write_data(f)
        f.create_dataset("label", data=np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError, match=r"ply_data_test0\.h5: not an h5 file with `data` and "
                                         r"`label`") as err:
        ModelNet40Dataset(root, "test")
    assert "\n" not in str(err.value)


def test_augmentation_is_random_and_anisotropic(txt_root):
    data = ModelNet40Dataset(txt_root, "test", augment=True)
    plain = ModelNet40Dataset(txt_root, "test")[0]["xyz"]
    first = data[0]["xyz"]
    set_epoch(data, 1)
    assert not torch.equal(first, data[0]["xyz"])  # drawn anew each epoch
    ratio = (first - first.mean(0)) / (plain - plain.mean(0))  # per-axis scale, 2/3 .. 3/2
    scale = ratio.median(0).values
    assert (scale > 2 / 3 - 1e-4).all() and (scale < 1.5 + 1e-4).all()
    assert scale.std() > 1e-3


def test_another_repositorys_cache_in_place_of_the_shapes_is_named(tmp_path):
    """Point-BERT / Point-MAE keep the lists and modelnet40_<split>_8192pts_fps.dat only."""
    root = write_txt_layout(tmp_path / "modelnet40_normal_resampled", [("chair", 1)],
                            [("chair", 2)], skip=("chair_0001", "chair_0002"))
    (root / "modelnet40_test_8192pts_fps.dat").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"none of the 1 listed shape files exists \(the "
                                                r"folder holds modelnet40_test_8192pts_fps\.dat: "
                                                r"another repository's cache"):
        ModelNet40Dataset(root, "test")


def test_a_byte_order_mark_is_not_part_of_the_first_name(txt_root):
    """A list saved by Windows' Notepad starts with one."""
    names = txt_root / "modelnet40_shape_names.txt"
    names.write_bytes(b"\xef\xbb\xbf" + names.read_bytes())
    assert ModelNet40Dataset(txt_root, "test").class_names == NAMES


def test_layout_is_recognised_or_refused(tmp_path, txt_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a ModelNet40 folder"):
        ModelNet40Dataset(tmp_path / "empty", "train")
    assert build_dataset("modelnet40", txt_root, "test").layout == "normal_resampled"
    with pytest.raises(FileNotFoundError, match="modelnet40_normal_resampled.zip"):
        build_dataset("modelnet40", tmp_path / "absent", "test")


def test_val_sha256_tells_the_held_out_shapes_by_their_points(txt_root):
    """What a run records of its validation split (lib/data/val_slice.val_sha256), compared at
    resume: it was None for ModelNet, so a held-out shape changed between a run and its resume
    went unseen. A training shape changed leaves it as it was."""
    from lib.data.val_slice import val_sha256

    def digest():
        return val_sha256(ModelNet40Dataset(txt_root, "val"))

    def move_first_point(path):  # its y to 0.5 (x holds the tag)
        lines = path.read_text().splitlines()
        x, _, rest = lines[0].split(",", 2)
        path.write_text("\n".join([f"{x},0.5,{rest}"] + lines[1:]) + "\n")

    first = digest()
    assert len(first) == 64 and digest() == first
    move_first_point(txt_root / "chair" / "chair_0011.txt")  # training: tag 11
    assert digest() == first
    move_first_point(txt_root / "airplane" / "airplane_0010.txt")  # validation: tag 10
    assert digest() != first
