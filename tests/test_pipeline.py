"""The whole workflow through the command-line scripts, as a user runs it, on a very small
synthetic part dataset: pretrain -> search -> finetune (distill) -> eval."""
import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lib.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    run("-m", "lib.data.synthetic", "--out", str(root), "--only", "parts",
        "--train-shapes", "4", "--eval-shapes", "2")
    return str(root / "parts")


def test_pretrain_search_finetune_eval(tiny_parts, tmp_path):
    pre, search, fine = (str(tmp_path / d) for d in ("pretrain", "search", "finetune"))
    run("pretrain.py", "--model", "pt_seg_tiny", "--dataset", "synthetic_parts", "--data-root",
        tiny_parts, "--num-points", "256", "--epochs", "1", "--batch-size", "8", "--out", pre)
    for name in ("best.pt", "last.pt", "args.json", "log.jsonl", "log.txt"):
        assert os.path.isfile(os.path.join(pre, name)), name
    meta, _, resume = load_checkpoint(os.path.join(pre, "last.pt"))
    assert meta["model"]["name"] == "pt_seg_tiny" and resume["epoch"] == 1

    run("search.py", "--ckpt", os.path.join(pre, "best.pt"), "--episodes", "3", "--warmup", "2",
        "--val-size", "8", "--batch-size", "8", "--keep-first-last", "8", "--out", search)
    with open(os.path.join(search, "policy.json")) as f:
        policy = json.load(f)
    assert policy["budget_ratio"] <= 0.1 + 1e-9
    assert set(policy) >= {"bits", "budget_ratio", "honest_bytes", "metric", "metric_fp32"}
    for name in ("policy.png", "episodes.jsonl", "search_state.pt", "baselines.md", "log.txt"):
        assert os.path.isfile(os.path.join(search, name)), name
    with open(os.path.join(search, "log.txt")) as f:
        assert "best policy (episode" in f.read()  # the console's last line
    tb = EventAccumulator(os.path.join(search, "tb"), size_guidance={"images": 0})
    tb.Reload()
    assert {f"search_bits/{name}" for name in policy["bits"]} <= set(tb.Tags()["scalars"])
    assert tb.Tags()["images"] == ["search_best/policy"]

    printed = run("finetune.py", "--ckpt", os.path.join(pre, "best.pt"), "--policy",
                  os.path.join(search, "policy.json"), "--keep-first-last", "8", "--distill",
                  "--epochs", "1", "--batch-size", "8", "--out", fine)
    assert "ins. mIoU" in printed
    ckpt = os.path.join(fine, "best.pt")
    meta, model, _ = load_checkpoint(ckpt)
    assert meta["quant"]["bits"] and meta["quant"]["keep_first_last"] == "8"

    report = str(tmp_path / "eval.json")
    shown = run("eval.py", "--ckpt", ckpt, "--json", report)
    assert "cat. mIoU" in shown and "Airplane" in shown
    with open(report) as f:
        evaluated = json.load(f)
    with open(os.path.join(fine, "best_test.json")) as f:
        finetuned = json.load(f)
    for key in ("accuracy", "cat_miou", "ins_miou", "honest_bytes"):
        assert evaluated[key] == finetuned[key], key
    assert evaluated["honest_bytes"] < 0.2 * evaluated["fp32_bytes"]


def test_resume_of_a_missing_checkpoint_is_an_error(tiny_parts, tmp_path):
    out = subprocess.run([sys.executable, "pretrain.py", "--dataset", "synthetic_parts",
                          "--data-root", tiny_parts, "--resume", str(tmp_path / "nope.pt")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "nope.pt: no such checkpoint file" in out.stderr
