"""ModelNet's OFF meshes (ModelNet40.zip / ModelNet10.zip): robust parsing, area-weighted seeded
sampling with a cache, ModelNet10, and one-line errors naming the file."""
import os
import shutil

import numpy as np
import pytest

from lib.data import build_dataset
from lib.data.modelnet40 import ModelNet40Dataset
from lib.data.off_mesh import read_off
from lib.data.synthetic_layouts import MESH_CLASSES, box, off_text, write_cls_off

BOX_OFF = off_text([box((0, 0, 0), (2.0, 1.0, 1.0))], joined_header=False)


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    root = tmp_path_factory.mktemp("off") / "ModelNet40"
    write_cls_off(root, seed=0, train_shapes=10, eval_shapes=2)
    return root


def write_class_meshes(root, texts, split="train"):
    """One class `thing` holding the given OFF texts as thing_0001.off, ..."""
    folder = root / "thing" / split
    folder.mkdir(parents=True)
    for k, text in enumerate(texts):
        (folder / f"thing_{k + 1:04d}.off").write_text(text)
    return root


def test_meshes_are_read_with_their_classes_and_sampled_once(meshes, capsys):
    test = ModelNet40Dataset(meshes, "test")
    assert test.layout == "off" and test.class_names == sorted(MESH_CLASSES)
    out = capsys.readouterr().out
    assert "ModelNet40.zip / ModelNet10.zip meshes" in out
    assert f"{meshes}: 4 class folders, where ModelNet40 has 40: the classes are the ones " \
           f"present" in out  # a partial download's classifier gets fewer outputs
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    cache = meshes.parent / "ModelNet40_sampled2048"
    assert len(list(cache.glob("*/test/*.npy"))) == 8
    for cloud in test.clouds:
        assert cloud.shape == (2048, 6)
        centred = cloud[:, :3]
        assert np.abs(centred.mean(0)).max() < 1e-5
        assert np.linalg.norm(centred, axis=1).max() == pytest.approx(1, abs=1e-6)
        assert np.linalg.norm(cloud[:, 3:], axis=1) == pytest.approx(1, abs=1e-5)
    again = ModelNet40Dataset(meshes, "test")  # from the cache: nothing sampled
    assert "sampling" not in capsys.readouterr().out
    assert all(np.array_equal(a, b) for a, b in zip(test.clouds, again.clouds))


def test_sampling_is_seeded_per_mesh(meshes, tmp_path):
    first = ModelNet40Dataset(meshes, "test", cache_dir=tmp_path / "a")
    second = ModelNet40Dataset(meshes, "test", cache_dir=tmp_path / "b")
    assert all(np.array_equal(a, b) for a, b in zip(first.clouds, second.clouds))
    assert not np.array_equal(first.clouds[0], first.clouds[1])


def test_cache_is_redone_when_the_mesh_is_newer(tmp_path):
    root = write_class_meshes(tmp_path / "m", [BOX_OFF])
    before = ModelNet40Dataset(root, "trainval", cache_dir=tmp_path / "c").clouds[0]
    mesh = root / "thing" / "train" / "thing_0001.off"
    mesh.write_text(off_text([box((0, 0, 0), (1.0, 1.0, 3.0))], joined_header=False))
    cached = next((tmp_path / "c").rglob("*.npy")).stat().st_mtime
    os.utime(mesh, (cached + 10, cached + 10))
    after = ModelNet40Dataset(root, "trainval", cache_dir=tmp_path / "c").clouds[0]
    assert np.abs(after[:, 2]).max() > 1.5 * np.abs(before[:, 2]).max()  # the tall box now


def test_damaged_cached_sample_is_sampled_again(tmp_path, capsys):
    root = write_class_meshes(tmp_path / "m", [BOX_OFF])
    before = ModelNet40Dataset(root, "trainval", cache_dir=tmp_path / "c").clouds[0]
    cached = next((tmp_path / "c").rglob("*.npy"))
    cached.write_bytes(cached.read_bytes()[:1000])  # a partial copy; still newer than the mesh
    after = ModelNet40Dataset(root, "trainval", cache_dir=tmp_path / "c").clouds[0]
    assert f"{cached}: not a sample of 2048 points" in capsys.readouterr().out
    np.testing.assert_array_equal(after, before)  # each mesh's sample is seeded by its name
    np.testing.assert_array_equal(np.load(cached), before)


def test_samples_lie_on_the_surface_and_follow_the_area(tmp_path):
    # A 2 x 1 x 1 box: the faces normal to x hold 2 of its 10 square units.
    root = write_class_meshes(tmp_path / "m", [BOX_OFF])
    cloud = ModelNet40Dataset(root, "trainval").clouds[0]
    xyz, normals = cloud[:, :3], cloud[:, 3:]
    axis = np.abs(normals).argmax(1)
    assert np.abs(normals).max(1) == pytest.approx(1)
    rows = np.arange(len(xyz))
    # Each point sits on the face its normal points out of: at the box's max (or min) along it.
    face = np.where(normals[rows, axis] > 0, xyz.max(0)[axis], xyz.min(0)[axis])
    assert xyz[rows, axis] == pytest.approx(face, abs=1e-5)
    assert np.mean(axis == 0) == pytest.approx(0.2, abs=0.04)


def test_header_joined_with_the_counts_is_read(tmp_path):
    joined = tmp_path / "joined.off"
    joined.write_text(off_text([box((0, 0, 0), (1, 1, 1))], joined_header=True))
    plain = tmp_path / "plain.off"
    plain.write_text("# a comment\n\n" + off_text([box((0, 0, 0), (1, 1, 1))], joined_header=False))
    assert joined.read_text().startswith("OFF8 6 0\n")
    for a, b in zip(read_off(joined), read_off(plain)):
        np.testing.assert_array_equal(a, b)
    assert read_off(joined)[1].shape == (12, 3)  # 6 quads fanned into triangles


@pytest.mark.parametrize("text, message", [
    ("", "not an OFF file"),
    ("PLY\n3 1 0\n", "not an OFF file"),
    ("OFF\n0 0 0\n", r"empty mesh \(0 vertices, 0 faces\)"),
    ("OFF\n", "empty mesh"),
    ("OFF\nthree 1 0\n", "expected `vertices faces edges` counts"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "the header promises 3 vertices and 1 faces"),
    ("OFF\n3 1 0\n0 0 0\n1 0 x\n0 1 0\n3 0 1 2\n", "line 4: not a vertex"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n2 0 1\n", "line 6: degenerate face"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "line 6: face refers to a vertex outside 0..2"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n", r"all 1 faces are degenerate \(zero area\)"),
])
def test_bad_mesh_is_one_line_naming_the_file(tmp_path, text, message):
    root = write_class_meshes(tmp_path / "m", [BOX_OFF, text])
    with pytest.raises(ValueError, match=r"thing_0002\.off: " + message) as err:
        ModelNet40Dataset(root, "train")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("emptied, split", [("train", "train"), ("train", "val"),
                                             ("test", "test")])
def test_class_folder_without_meshes_in_the_split_is_an_error_naming_it(tmp_path, emptied, split):
    """An emptied class folder (or a copy stopped part-way) kept its class among the outputs
    with no shape of it to train or score on, and said nothing: the count of class folders
    was right."""
    root = tmp_path / "ModelNet40"
    write_cls_off(root, seed=0, train_shapes=2, eval_shapes=1)
    empty = root / "chair" / emptied
    for mesh in empty.iterdir():
        mesh.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{empty}: no \.off meshes, where the 3 other "
                                                rf"classes' {emptied}/ folders hold some") as err:
        ModelNet40Dataset(root, split, cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)
    (root / "chair" / emptied).rmdir()  # the folder gone too: the same
    with pytest.raises(FileNotFoundError, match=rf"{empty}: no \.off meshes"):
        ModelNet40Dataset(root, split, cache_dir=tmp_path / "c")


def test_modelnet10_from_the_meshes_keeps_its_ten_classes(meshes):
    data = build_dataset("modelnet10", meshes, "test")
    assert data.class_names == ["chair", "table"]  # the ModelNet10 classes among these four
    assert data.labels.tolist() == [0, 0, 1, 1]


def test_modelnet10_from_the_resampled_release_uses_its_lists(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    for variant, names in ((40, ["chair", "lamp"]), (10, ["chair"])):
        (root / f"modelnet{variant}_shape_names.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"modelnet{variant}_shape_names.txt").write_text("".join(n + "\n" for n in names))
        for split in ("train", "test"):
            entries = [f"{n}_{k:04d}" for n in names for k in (1, 2)]
            (root / f"modelnet{variant}_{split}.txt").write_text("".join(e + "\n" for e in entries))
    rng = np.random.default_rng(0)
    for name in ("chair", "lamp"):
        (root / name).mkdir()
        for k in (1, 2):
            np.savetxt(root / name / f"{name}_{k:04d}.txt", rng.uniform(-1, 1, (50, 6)),
                       fmt="%.6f", delimiter=",")
    ten = build_dataset("modelnet10", root, "test", num_points=50)
    assert ten.class_names == ["chair"] and len(ten) == 2
    assert len(build_dataset("modelnet40", root, "test", num_points=50)) == 4


def test_modelnet10_is_refused_by_the_h5_release(tmp_path):
    (tmp_path / "shape_names.txt").write_text("chair\n")
    with pytest.raises(FileNotFoundError, match="holds no ModelNet10; use modelnet40_normal_resampled"):
        build_dataset("modelnet10", tmp_path, "test")


def test_unknown_folder_names_the_supported_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a ModelNet40 folder; supported: .*"
                                                "normal_resampled.*hdf5.*off"):
        ModelNet40Dataset(tmp_path, "train")


def test_meshes_one_folder_down_are_named_with_the_data_root_to_give(meshes, tmp_path):
    """PyG's ModelNet keeps the meshes in <root>/raw/<class>/{train,test}/*.off."""
    shutil.copytree(meshes, tmp_path / "ModelNet40" / "raw")
    (tmp_path / "ModelNet40" / "processed").mkdir()  # PyG's own cache, not read
    with pytest.raises(FileNotFoundError) as err:
        ModelNet40Dataset(tmp_path / "ModelNet40", "train")
    assert "\n" not in str(err.value)
    assert (f"not a ModelNet40 folder, but its subfolder raw/ does (as PyG keeps a release in "
            f"raw/" in str(err.value))
    assert f"give --data-root {tmp_path / 'ModelNet40' / 'raw'}; supported" in str(err.value)


def test_macos_metadata_files_beside_the_meshes_are_not_read(tmp_path):
    """ModelNet copied by macOS to an exFAT or FAT drive carries a '._<name>.off' file of
    metadata beside every mesh: the glob took them for meshes and the run stopped with 'not an
    OFF file'."""
    clean = write_class_meshes(tmp_path / "clean" / "ModelNet40", [BOX_OFF] * 3)
    copied = write_class_meshes(tmp_path / "copied" / "ModelNet40", [BOX_OFF] * 3)
    for mesh in list((copied / "thing" / "train").iterdir()):
        (mesh.parent / f"._{mesh.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    for split in ("train", "val"):
        read = ModelNet40Dataset(copied, split, cache_dir=tmp_path / "cache" / split)
        want = ModelNet40Dataset(clean, split, cache_dir=tmp_path / "clean_cache" / split)
        assert len(read.clouds) == len(want.clouds) > 0 and read.class_names == ["thing"]


def test_read_only_mesh_folders_of_one_name_keep_their_samples_apart(tmp_path, monkeypatch):
    """Where the meshes' folder is read-only their samples go under data/cache/: two such
    folders both named ModelNet40 (two shares, the second's meshes changed) shared one cache,
    and the second read the first one's samples."""
    import lib.data
    import lib.data.modelnet40 as modelnet40
    first = write_class_meshes(tmp_path / "share1" / "ModelNet40", [BOX_OFF])
    second = write_class_meshes(tmp_path / "share2" / "ModelNet40", [off_text(
        [box((0, 0, 0), (1.0, 1.0, 4.0))], joined_header=False)])
    real_access = os.access
    monkeypatch.setattr(modelnet40.os, "access", lambda path, mode: (
        False if str(path).startswith(str(tmp_path / "share")) else real_access(path, mode)))
    monkeypatch.setattr(lib.data, "DATA_DIR", tmp_path / "data")
    a = ModelNet40Dataset(first, "trainval").clouds[0]
    b = ModelNet40Dataset(second, "trainval").clouds[0]
    assert not (tmp_path / "share1" / "ModelNet40_sampled2048").exists()
    assert np.ptp(b[:, 2]) > 1.5 * np.ptp(b[:, 0]) and not np.array_equal(a, b)
    # samples beside a read-only folder (made by whoever could write there) are read, not redone
    shutil.copytree(modelnet40.default_cache_dir(second, 2048),
                    tmp_path / "share2" / "ModelNet40_sampled2048")
    shutil.rmtree(tmp_path / "data" / "cache")
    monkeypatch.setattr(modelnet40, "sample_surface", None)  # sampling would fail
    assert np.array_equal(ModelNet40Dataset(second, "trainval").clouds[0], b)
