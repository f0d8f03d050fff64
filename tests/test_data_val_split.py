"""The validation protocol (--val-split): a fixed tenth of train stands in for a val split with no
file present (a partial download), on request, and trainval trains on train + val."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.checkpoint import load_checkpoint
from lib.data import synthetic
from lib.data.transforms import set_epoch
from lib.data.val_slice import SLICE_EVERY, val_slice
from lib.experiment import dataset_meta, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts") / "parts"
    synthetic.write_parts(root, seed=0, train_shapes=4, eval_shapes=2)
    return root


@pytest.fixture
def partial(parts, tmp_path):
    """The parts folder with every val shape's file missing, as after a partial download."""
    root = shutil.copytree(parts, tmp_path / "partial")
    for entry in json.loads((root / "train_test_split" / "shuffled_val_file_list.json").read_text()):
        (root / entry.removeprefix("shape_data/")).with_suffix(".txt").unlink()
    return root


def ids(data):
    return [data.shape_ids[i] for i in data.indices]


def test_slice_is_a_fixed_tenth_disjoint_from_the_rest():
    held_out, kept = val_slice(95)
    assert len(held_out) == 95 // SLICE_EVERY
    assert sorted(np.concatenate([held_out, kept]).tolist()) == list(range(95))
    assert np.array_equal(held_out, val_slice(95)[0])  # fixed: the same on every call
    with pytest.raises(ValueError, match="too few to hold out"):
        val_slice(1)


def test_missing_val_files_fall_back_to_a_slice_of_train(partial, capsys):
    train = load_split("synthetic_parts", str(partial), "train", 64, augment=True)
    val = load_split("synthetic_parts", str(partial), "val", 64)
    assert "validating on a fixed tenth of the training split" in capsys.readouterr().out
    test = load_split("synthetic_parts", str(partial), "test", 64)
    assert len(test) == 12 and not hasattr(test, "indices")  # the test split is never sliced
    assert len(val) == 24 // SLICE_EVERY and len(train) == 24 - len(val)
    assert not set(ids(val)) & set(ids(train))
    assert torch.equal(val[0]["xyz"], val[0]["xyz"])  # val is not augmented
    copy = pickle.loads(pickle.dumps(val))  # as DataLoader workers started by spawn get it
    assert ids(copy) == ids(val) and torch.equal(copy[0]["xyz"], val[0]["xyz"])
    first = train[0]["xyz"]
    set_epoch(train, 1)  # reaches the dataset inside the slice
    assert not torch.equal(first, train[0]["xyz"])
    meta = dataset_meta("synthetic_parts", str(partial), train, 64)
    assert "tenth of the training split" in meta["val_source"] and meta["task"] == "partseg"


def test_val_split_is_used_when_present_and_the_slice_on_request(parts):
    val = load_split("synthetic_parts", str(parts), "val", 64)
    assert len(val) == 12 and not hasattr(val, "indices")
    train = load_split("synthetic_parts", str(parts), "train", 64)
    assert train.val_source == "the dataset's val split" and len(train) == 24
    sliced_val = load_split("synthetic_parts", str(parts), "val", 64, val_split="train-slice")
    sliced_train = load_split("synthetic_parts", str(parts), "train", 64, val_split="train-slice")
    assert len(sliced_val) + len(sliced_train) == 24
    assert not set(ids(sliced_val)) & set(ids(sliced_train))


def test_trainval_trains_on_train_and_val(parts, tmp_path):
    train = load_split("synthetic_parts", str(parts), "train", 64, val_split="trainval")
    assert len(train) == 24 + 12 and "trainval" in train.val_source
    cls_root = tmp_path / "cls"
    synthetic.write_cls(cls_root, seed=0, train_shapes=10, eval_shapes=1)
    root = str(cls_root / "modelnet40_normal_resampled")
    whole = load_split("synthetic_cls", root, "train", 64, val_split="trainval")
    held_out = load_split("synthetic_cls", root, "val", 64, val_split="trainval")
    assert len(whole) == 100 and len(held_out) == 10  # ModelNet's own held-out tenth
    with pytest.raises(ValueError, match="unknown --val-split"):
        load_split("synthetic_cls", root, "train", 64, val_split="test")


def test_a_partial_download_trains(partial, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "pretrain.py", "--model", "pt_seg_tiny", "--dataset", "synthetic_parts",
         "--data-root", str(partial), "--epochs", "1", "--num-points", "128", "--batch-size", "8",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "validating on a fixed tenth of the training split" in result.stdout
    meta, _, _ = load_checkpoint(str(out / "best.pt"))
    assert "tenth of the training split" in meta["dataset"]["val_source"]
    assert meta["args"]["val_split"] == "auto"


def test_checkpoint_records_the_features_and_refuses_a_form_without_them(parts, tmp_path):
    """A model trained on normals must not be scored on a form that feeds xyz instead."""
    from lib.checkpoint import save_checkpoint
    from lib.data.synthetic_layouts import parts_as
    from lib.experiment import evaluate_checkpoint, model_kwargs
    from models import build_model
    train = load_split("synthetic_parts", str(parts), "train", 64)
    model = build_model("pt_seg_tiny", **model_kwargs("pt_seg_tiny", train))
    meta = {"model": {"name": "pt_seg_tiny", "kwargs": model_kwargs("pt_seg_tiny", train)},
            "dataset": dataset_meta("synthetic_parts", str(parts), train, 64), "args": {},
            "quant": None, "metrics": {}, "epoch": 0}
    assert meta["dataset"]["features"] == "normals"
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, meta)
    parts_as(parts, tmp_path / "h5", "hdf5")
    with pytest.raises(ValueError, match="trained with normals as point features, but the data "
                                         r".*h5 \(hdf5\) has xyz"):
        evaluate_checkpoint(path, str(tmp_path / "h5"))


def test_a_resume_refuses_a_val_split_whose_shapes_changed(parts, tmp_path, capsys):
    """A resume compared what validates the run (val_key: the val list), not which shapes: a
    val list edited, or a val shape's file replaced, between a run and its resume was taken,
    and the resumed run's scores were held against its best so far on another split (best.pt
    picked across two). The shapes' SHA-256 is recorded (dataset val_sha256) by pretrain.py and
    finetune.py and compared, in one line naming the list; a checkpoint written before the
    record resumes. eval.py --split val scores the changed split, saying that it differs."""
    import importlib
    from lib.cli import run_script

    def run(script, *argv):
        module = importlib.import_module(script)
        kind = None if script == "eval" else script  # which runs it may resume
        run_script(module.main, module.get_args_parser(), kind, [str(a) for a in argv])

    root = shutil.copytree(parts, tmp_path / "parts")
    runs = {"pretrain": tmp_path / "pretrain", "finetune": tmp_path / "finetune"}
    run("pretrain", "--dataset", "synthetic_parts", "--data-root", root, "--num-points", 64,
        "--batch-size", 8, "--epochs", 1, "--out", runs["pretrain"])
    run("finetune", "--ckpt", runs["pretrain"] / "best.pt", "--bits", 4, "--batch-size", 8,
        "--epochs", 1, "--out", runs["finetune"])
    scored = ("eval", "--ckpt", runs["pretrain"] / "best.pt", "--split", "val")
    capsys.readouterr()
    run(*scored)
    assert "other shapes or rooms than the run validated on" not in capsys.readouterr().out
    val_list = root / "train_test_split" / "shuffled_val_file_list.json"
    listed = json.loads(val_list.read_text())
    val_list.write_text(json.dumps(listed[:-1]))
    shape = (root / listed[-1].removeprefix("shape_data/")).with_suffix(".txt")
    lines = shape.read_text().splitlines()
    for changed in ("list", "shape"):
        for script, out in runs.items():
            with pytest.raises(SystemExit) as refused:
                run(script, "--resume", out, "--epochs", 2)
            message = str(refused.value.code)
            assert "\n" not in message and message.startswith(f"error: {out / 'last.pt'}: ")
            assert (f"other validation shapes (now {len(listed) - (changed == 'list')} shapes "
                    f"from {val_list}, not the ones") in message, message
        val_list.write_text(json.dumps(listed))  # the list as it was, one shape's points moved
        shape.write_text("\n".join(["0.5 " + lines[0].split(" ", 1)[1]] + lines[1:]) + "\n")
    run(*scored)
    assert ("the val split now holds other shapes or rooms than the run validated on"
            in capsys.readouterr().out)
    last = torch.load(runs["pretrain"] / "last.pt", weights_only=True)  # as before the record
    del last["meta"]["dataset"]["val_sha256"]
    torch.save(last, runs["pretrain"] / "last.pt")
    run("pretrain", "--resume", runs["pretrain"], "--epochs", 2)
    assert load_checkpoint(str(runs["pretrain"] / "last.pt"))[0]["dataset"]["val_sha256"]


# What val_source said before val_key existed, for each protocol (lib/data/val_slice.py as of
# 0657adc): older checkpoints hold only these words.
SENTENCES_THEN = {
    "held-out": "the dataset's held-out tenth of train",
    "held-out, trainval": "the dataset's held-out tenth of train, inside the training data "
                          "(trainval)",
    "val list": "the dataset's val split",
    "val list, trainval": "the val split (or a tenth of train where none is present), inside the "
                          "training data (trainval)",
    "slice": "a fixed tenth of the training split (2 samples, seed 0), left out of training",
}


@pytest.fixture(scope="module")
def training_splits(parts, tmp_path_factory):
    """dataset_meta of the training split under each protocol, as a run records it now."""
    cls_root = tmp_path_factory.mktemp("cls") / "cls"
    synthetic.write_cls(cls_root, seed=0, train_shapes=1, eval_shapes=1)
    cls = ("synthetic_cls", str(cls_root / "modelnet40_normal_resampled"))
    splits = {"held-out": (*cls, "auto"), "held-out, trainval": (*cls, "trainval"),
              "val list": ("synthetic_parts", str(parts), "auto"),
              "val list, trainval": ("synthetic_parts", str(parts), "trainval"),
              "slice": ("synthetic_parts", str(parts), "train-slice")}
    return {name: dataset_meta(dataset, root, load_split(dataset, root, "train", 64,
                                                         val_split=protocol), 64)
            for name, (dataset, root, protocol) in splits.items()}


def test_a_resume_compares_what_the_val_split_is_not_its_words(training_splits):
    """A checkpoint's val_source was compared as a sentence: rewording it in the code refused
    every older run's resume. val_key (what the split is) is compared now; older checkpoints,
    which hold the sentence alone, resume when it means the split found now, and a run whose
    validation split changed is refused in one line either way."""
    from lib.experiment import check_resumed_data
    not_started = {"epoch": 0}
    for name, now in training_splits.items():
        check_resumed_data("last.pt", dict(now, val_source="reworded"), now, not_started, 1)
        check_resumed_data("last.pt", before_keys(now, SENTENCES_THEN[name]), now, not_started, 1)
        for other, then in training_splits.items():
            if other == name:
                continue
            for recorded in (then, before_keys(then, SENTENCES_THEN[other])):
                with pytest.raises(ValueError) as refused:
                    check_resumed_data("last.pt", recorded, now, not_started, 1)
                message = str(refused.value)
                assert "\n" not in message and "other validation split (now " in message, message
    sliced = training_splits["slice"]
    three = before_keys(sliced, SENTENCES_THEN["slice"].replace("2 samples", "3 samples"))
    with pytest.raises(ValueError, match="other validation split"):
        check_resumed_data("last.pt", three, sliced, not_started, 1)


def before_keys(record, sentence):
    """A data record as a checkpoint written before val_key holds it."""
    return dict({key: value for key, value in record.items() if key != "val_key"},
                val_source=sentence)
