"""A reader's "no layout found" error on a folder of another dataset this repository reads names
that dataset and the flags that read it (lib/data/recognise.py), in the one line; an empty
folder gets no such clause."""
import numpy as np
import pytest

from lib.data import build_dataset, recognise
from lib.data.__main__ import main as check_data
from lib.data.synthetic_rooms import write_rooms
from lib.experiment import evaluate_checkpoint
from test_data_modelnet import h5_arrays, write_h5_layout, write_txt_layout
from test_data_shapenet import shape_table, write_root
from tiny_checkpoints import make_checkpoint, write_tiny_data


def write_shapenet(root):
    table = shape_table(np.random.default_rng(0), 20, [0, 1])
    return write_root(root, {"test": [("02691156", "a")]}, {("02691156", "a"): table})


def write_modelnet(root):
    return write_txt_layout(root, [("chair", 1)], [("chair", 2)], lines=20)


def write_modelnet_h5(root):
    return write_h5_layout(root, [("ply_data_train0.h5", *h5_arrays(0, 2))])


def write_s3dis(root):
    write_rooms(str(root), seed=0, areas=(5,), rooms_per_area=1, points_per_m2=5.0)
    return root


# writer, the dataset it writes, what the hint names
LAYOUTS = {
    "shapenet_part": (write_shapenet, "ShapeNet part (shapenetcore_partanno_segmentation_"
                                      "benchmark_v0_normal): --dataset shapenet_part / "
                                      "TASK=partseg reads it"),
    "modelnet40": (write_modelnet, "ModelNet40 (modelnet40_normal_resampled): --dataset "
                                   "modelnet40 / TASK=modelnet40_pt or modelnet40_pct reads it"),
    "modelnet40_h5": (write_modelnet_h5, "ModelNet40 (modelnet40_ply_hdf5_2048): --dataset "
                                         "modelnet40 / TASK=modelnet40_pt or modelnet40_pct "
                                         "reads it"),
    "s3dis": (write_s3dis, "S3DIS (raw release): --dataset s3dis / TASK=s3dis reads it"),
}
READERS = ("shapenet_part", "modelnet40", "s3dis")
NOT_FOUND = {"shapenet_part": "no ShapeNet part layout found", "modelnet40":
             "not a ModelNet40 folder", "s3dis": "no S3DIS layout found",
             "synthetic_rooms": "no S3DIS layout found"}


def not_found(dataset, root):
    """The one-line error of `dataset`'s reader on `root`."""
    with pytest.raises(FileNotFoundError) as caught:
        build_dataset(dataset, root, "test")
    message = str(caught.value)
    assert NOT_FOUND[dataset] in message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("reader, held", [
    (reader, held) for reader in READERS for held in LAYOUTS if not held.startswith(reader)])
def test_another_datasets_folder_is_named_with_its_flags(tmp_path, reader, held):
    write, hint = LAYOUTS[held]
    message = not_found(reader, write(tmp_path / held))
    assert message.endswith(f"; it looks like {hint}")
    # a folder of nothing is named as nothing: the reader's line ends with its supported layouts
    (tmp_path / "empty").mkdir()
    message = not_found(reader, tmp_path / "empty")
    assert "looks like" not in message and message.endswith(supported_layouts(reader))


def supported_layouts(reader):
    """How the reader's message ends without a hint: its list of supported layouts."""
    from lib.data import modelnet40, s3dis_forms, shapenet_part
    return {"shapenet_part": "; ".join(shapenet_part.LAYOUTS.values()),
            "modelnet40": "; ".join(modelnet40.LAYOUTS.values()),
            "s3dis": s3dis_forms.SUPPORTED}[reader]


def test_the_synthetic_folders_are_named_as_the_synthetic_datasets(tmp_path, monkeypatch):
    """data/synthetic/'s folders name the synthetic dataset that reads them; cls/ is the family
    folder of both ModelNet layouts, named by its first subfolder."""
    monkeypatch.setattr(recognise, "SYNTHETIC_DIR", tmp_path)
    write_tiny_data(tmp_path)
    message = not_found("s3dis", tmp_path / "parts")
    assert message.endswith("; it looks like the synthetic ShapeNet part (shapenetcore_partanno_"
                            "segmentation_benchmark_v0_normal): --dataset synthetic_parts reads it")
    message = not_found("shapenet_part", tmp_path / "rooms")
    assert message.endswith("; it looks like the synthetic S3DIS (raw release): --dataset "
                            "synthetic_rooms reads it")
    message = not_found("synthetic_rooms", tmp_path / "cls")
    assert message.endswith(f"; its subfolder modelnet40_normal_resampled/ looks like the "
                            f"synthetic ModelNet40 (modelnet40_normal_resampled): give --data-root "
                            f"{tmp_path / 'cls' / 'modelnet40_normal_resampled'} with --dataset "
                            f"synthetic_cls")
    # outside data/synthetic/ the same layouts are the real datasets'
    monkeypatch.setattr(recognise, "SYNTHETIC_DIR", tmp_path / "elsewhere")
    message = not_found("modelnet40", tmp_path / "parts")
    assert message.endswith(f"; it looks like {LAYOUTS['shapenet_part'][1]}")


def test_a_subfolder_of_another_dataset_is_named_with_the_folder_to_give(tmp_path):
    write_modelnet(tmp_path / "download" / "modelnet40_normal_resampled")
    message = not_found("shapenet_part", tmp_path / "download")
    assert message.endswith(f"; its subfolder modelnet40_normal_resampled/ looks like ModelNet40 "
                            f"(modelnet40_normal_resampled): give --data-root "
                            f"{tmp_path / 'download' / 'modelnet40_normal_resampled'} with "
                            f"--dataset modelnet40 (DATA= with TASK=modelnet40_pt or "
                            f"modelnet40_pct)")
    # beside a subfolder of the reader's own dataset, which its error names, the other is noise
    write_shapenet(tmp_path / "download" / "shapenet")
    message = not_found("shapenet_part", tmp_path / "download")
    assert "its subfolder shapenet/ does" in message and "looks like" not in message


def test_the_data_check_says_it(tmp_path, capsys):
    """python -m lib.data --dataset s3dis --data-root <a ShapeNet part folder>"""
    root = write_shapenet(tmp_path / "shapenet")
    with pytest.raises(SystemExit):
        check_data(type("Args", (), dict(dataset="s3dis", data_root=str(root), num_points=None)))
    printed = capsys.readouterr().out
    assert f"test: {root}: no S3DIS layout found" in printed
    assert f"; it looks like {LAYOUTS['shapenet_part'][1]}\n" in printed


def test_eval_with_another_datasets_data_root_says_it(tmp_path):
    """eval.py --ckpt <a classification checkpoint> --data-root <an S3DIS folder>"""
    data = write_tiny_data(tmp_path / "data", tasks=("cls",))
    ckpt = make_checkpoint(tmp_path / "best.pt", "cls", data)
    with pytest.raises(FileNotFoundError, match=r"not a ModelNet40 folder.*; it looks like "
                                                r"S3DIS \(raw release\): --dataset s3dis / "
                                                r"TASK=s3dis reads it$"):
        evaluate_checkpoint(ckpt, str(write_s3dis(tmp_path / "s3dis")))


def test_pointnets_s3dis_blocks_are_not_taken_for_shapenet_parts_h5_form(tmp_path):
    """ShapeNet part's h5 form was recognised by any ply_data_*.h5, PointNet's S3DIS blocks
    (ply_data_all_*.h5) and ModelNet40's hdf5 release included: the reader then asked for its
    category list there, and other readers' hints named that folder ShapeNet part."""
    from lib.data.shapenet_part_h5 import find_h5_folder
    blocks = tmp_path / "indoor3d_sem_seg_hdf5_data"
    blocks.mkdir()
    (blocks / "ply_data_all_0.h5").write_bytes(b"")
    assert find_h5_folder(blocks) is None
    assert "looks like" not in not_found("modelnet40", blocks)
    assert find_h5_folder(write_modelnet_h5(tmp_path / "modelnet")) is None
    lost_lists = tmp_path / "shapenet_h5"
    lost_lists.mkdir()
    (lost_lists / "ply_data_train0.h5").write_bytes(b"")
    assert find_h5_folder(lost_lists) == lost_lists  # read as its h5 form, the lists asked for
