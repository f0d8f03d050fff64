"""eval.py --save-pred / --render on every task, fp32 and packed quantized: the written PLY files
hold exactly the predictions the metric scored (the metric recomputed from the files matches),
and the figures are PNGs of the size lib/render.py promises."""
import csv
import glob
import importlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lib.data import s3dis
from lib.experiment import load_split
from lib.metrics import ClsMetric, PartSegMetric, SemSegMetric
from lib.ply import read_ply
from lib.render import CHART_SIZE, CLS_SIZE, CONFUSION_SIZE, ROOM_SIZE, SHAPE_SIZE, pixel_size
from tiny_checkpoints import TASKS, make_checkpoint, write_tiny_data

eval_script = importlib.import_module("eval")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))


def run_eval(tmp_path, ckpt, render):
    """eval.py --save-pred tmp_path/pred (and --render 1 into tmp_path/figures) -> its metrics."""
    argv = ["--ckpt", ckpt, "--json", str(tmp_path / "r.json"),
            "--save-pred", str(tmp_path / "pred")]
    if render:
        argv += ["--render", "1", "--render-dir", str(tmp_path / "figures")]
    eval_script.main(eval_script.get_args_parser().parse_args(argv))
    return json.loads((tmp_path / "r.json").read_text())


def check_figures(folder, sample_size, samples=1):
    """`samples` prediction figures of sample_size and the two charts, none of them blank."""
    pngs = sorted(p.name for p in folder.glob("*.png"))
    charts = {"per_class_iou.png": CHART_SIZE, "confusion.png": CONFUSION_SIZE}
    assert len(pngs) == samples + len(charts) and set(charts) <= set(pngs)
    for name in pngs:
        with Image.open(folder / name) as image:
            assert image.size == pixel_size(charts.get(name, sample_size)), name
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{name} is (nearly) blank"


@pytest.mark.parametrize("packed", [False, True], ids=["fp32", "packed"])
def test_save_pred_round_trips_part_segmentation(data_root, tmp_path, packed):
    ckpt = make_checkpoint(tmp_path / "seg.pt", "partseg", data_root, packed)
    results = run_eval(tmp_path, ckpt, render=packed)
    dataset = load_split("synthetic_parts", str(data_root / "parts"), "test", 256)
    files = sorted(glob.glob(str(tmp_path / "pred" / "*.ply")))
    assert len(files) == len(dataset) == results["num_shapes"]
    metric = PartSegMetric(dataset.part_ranges, dataset.category_names)
    for i, path in enumerate(files):
        fields, comments = read_ply(path)
        sample = dataset[i]
        category = dataset.category_names[int(sample["category"])]
        assert os.path.basename(path) == f"{i:05d}_{category}.ply"
        assert f"category {category}" in comments
        xyz = np.stack([fields["x"], fields["y"], fields["z"]], 1)
        np.testing.assert_array_equal(xyz, sample["xyz"].numpy())
        np.testing.assert_array_equal(fields["label"], sample["label"].numpy())
        start, stop = dataset.part_ranges[int(sample["category"])]
        assert ((fields["pred"] >= start) & (fields["pred"] < stop)).all()  # category's parts only
        metric.update_predictions(torch.from_numpy(fields["pred"].astype(np.int64))[None],
                                  sample["label"][None], sample["category"][None])
    again = metric.compute()
    assert again["ins_miou"] == results["ins_miou"] and again["accuracy"] == results["accuracy"]
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == [os.path.basename(p) for p in files]
    assert (tmp_path / "pred" / "README.txt").read_text().startswith("Predictions of")
    if packed:
        check_figures(tmp_path / "figures", SHAPE_SIZE)


def test_save_pred_round_trips_voted_rooms_at_full_resolution(data_root, tmp_path):
    ckpt = make_checkpoint(tmp_path / "semseg.pt", "semseg", data_root)
    results = run_eval(tmp_path, ckpt, render=True)
    raw = os.path.join(data_root / "rooms", s3dis.RAW_DIRNAME)
    names = s3dis.list_rooms(raw, (5,))
    metric = SemSegMetric(s3dis.CLASS_NAMES)
    for name in names:
        fields, _ = read_ply(str(tmp_path / "pred" / f"{name}.ply"))
        original = np.load(os.path.join(s3dis.default_processed_dir(raw), name + ".npz"))
        # every original point, in the processed room's order, with its own label
        np.testing.assert_array_equal(np.stack([fields["x"], fields["y"], fields["z"]], 1),
                                      original["xyz"])
        np.testing.assert_array_equal(fields["label"], original["label"])
        metric.update(torch.from_numpy(fields["pred"].astype(np.int64)),
                      torch.from_numpy(fields["label"].astype(np.int64)))
    again = metric.compute()
    assert again["confusion"] == results["confusion"] and again["miou"] == results["miou"]
    check_figures(tmp_path / "figures", ROOM_SIZE)


@pytest.mark.parametrize("packed", [False, True], ids=["fp32", "packed"])
def test_save_pred_round_trips_classification(data_root, tmp_path, packed):
    ckpt = make_checkpoint(tmp_path / "cls.pt", "cls", data_root, packed)
    results = run_eval(tmp_path, ckpt, render=packed)
    dataset = load_split("synthetic_cls", str(data_root / TASKS["cls"][1]), "test", 256)
    metric = ClsMetric(dataset.class_names)
    files = sorted(glob.glob(str(tmp_path / "pred" / "*.ply")))
    assert len(files) == len(dataset)
    for i, path in enumerate(files):
        fields, _ = read_ply(path)
        assert len(set(fields["pred"])) == 1 and (fields["label"] == int(dataset[i]["label"])).all()
        metric.update(torch.from_numpy(fields["pred"][:1].astype(np.int64)),
                      torch.from_numpy(fields["label"][:1].astype(np.int64)))
    assert metric.compute()["oa"] == results["oa"]
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    names, written = dataset.class_names, [read_ply(path)[0] for path in files]
    assert [(row["ground_truth"], row["prediction"]) for row in rows] == [
        (names[int(fields["label"][0])], names[int(fields["pred"][0])]) for fields in written]
    if packed:
        check_figures(tmp_path / "figures", CLS_SIZE)


def test_eval_refuses_data_whose_categories_differ_from_the_checkpoints(data_root, tmp_path):
    """The category enters the model as a one-hot in the category file's order: a reordered file
    would feed every shape another category's code, and score without a word."""
    import shutil
    from lib.experiment import evaluate_checkpoint
    ckpt = make_checkpoint(tmp_path / "seg.pt", "partseg", data_root)
    root = tmp_path / "parts"
    shutil.copytree(data_root / "parts", root)
    categories = root / "synsetoffset2category.txt"
    lines = categories.read_text().splitlines(keepends=True)
    categories.write_text("".join(lines[::-1]))
    with pytest.raises(ValueError, match="lists other category names"):
        evaluate_checkpoint(ckpt, str(root))


def test_a_checkpoint_whose_recorded_data_folder_is_gone_names_data_root(data_root, tmp_path):
    """A checkpoint brought from another machine or folder records a data folder that is not
    here: eval.py said so in one line asking for --data-root, where it generated synthetic data
    at that foreign path (the default set, not the data the model was trained on) and scored it,
    and for real data asked to download it into that path."""
    import shutil
    from lib.experiment import evaluate_checkpoint
    shutil.copytree(data_root / "parts", tmp_path / "there" / "parts")
    ckpt = make_checkpoint(tmp_path / "seg.pt", "partseg", tmp_path / "there")
    shutil.move(tmp_path / "there", tmp_path / "here")
    with pytest.raises(FileNotFoundError, match=r"there/parts.*does not exist here.*--data-root"):
        evaluate_checkpoint(ckpt)
    assert not (tmp_path / "there").exists()  # nothing generated at the recorded path
    _, results = evaluate_checkpoint(ckpt, str(tmp_path / "here" / "parts"))
    assert results["num_shapes"] == 12


def test_a_checkpoint_moved_with_its_data_reads_the_moved_data(data_root, tmp_path):
    """A repository copied elsewhere with its checkpoints/ and data/ (the demo's tree on
    another machine): the recorded folder is gone, and the data at the same place in the moved
    tree is read, as where it was written."""
    import shutil
    from lib.checkpoint import load_checkpoint, save_checkpoint
    from lib.experiment import evaluate_checkpoint
    tree = tmp_path / "there"
    shutil.copytree(data_root / "parts", tree / "data" / "parts")
    run = tree / "checkpoints" / "run" / "pretrain"
    run.mkdir(parents=True)
    ckpt = make_checkpoint(run / "best.pt", "partseg", tree / "data")
    meta, model, _ = load_checkpoint(ckpt)
    save_checkpoint(ckpt, model, dict(meta, args={"out": str(run)}))  # as pretrain.py records
    shutil.move(tree, tmp_path / "here")
    meta, results = evaluate_checkpoint(str(tmp_path / "here" / "checkpoints" / "run" / "pretrain"
                                            / "best.pt"))
    assert results["num_shapes"] == 12 and not tree.exists()
    # moved on its own, its folder names no longer match the tree's: the data is asked for
    shutil.copy(tmp_path / "here" / "checkpoints" / "run" / "pretrain" / "best.pt",
                tmp_path / "alone.pt")
    with pytest.raises(FileNotFoundError, match="does not exist here"):
        evaluate_checkpoint(str(tmp_path / "alone.pt"))
