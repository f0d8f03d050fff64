"""search.py as a user runs it on the semantic-segmentation and classification layouts, with a
reward subset far smaller than the val split, and under torchrun (2 processes, gloo) against
one process."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import search as search_script
from lib.checkpoint import save_checkpoint
from lib.data.synthetic import write_cls
from lib.data.synthetic_rooms import write_rooms
from lib.experiment import dataset_meta, load_split, model_kwargs
from lib.tasks import model_inputs, supervised_loss
from models import build_model
from torch.utils.data import default_collate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def fp32_checkpoint(path, model_name, dataset_name, root, num_points, steps=0):
    """A model's checkpoint as pretrain.py writes it, after `steps` quick training steps (an
    untrained semseg model predicts one absent class: mIoU 0 whatever the policy)."""
    val = load_split(dataset_name, root, "val", num_points)
    torch.manual_seed(0)
    model = build_model(model_name, **model_kwargs(model_name, val))
    train = load_split(dataset_name, root, "train", num_points)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = default_collate([train[(2 * step + i) % len(train)] for i in range(2)])
        loss = supervised_loss(model(*model_inputs(batch, train.task)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    meta = {"model": {"name": model_name, "kwargs": model_kwargs(model_name, val)},
            "dataset": dataset_meta(dataset_name, root, val, num_points)}
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def rooms_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rooms")
    write_rooms(str(root), seed=0, rooms_per_area=2, points_per_m2=40.0)
    return fp32_checkpoint(str(root / "fp32.pt"), "pt_semseg_tiny", "synthetic_rooms", str(root),
                           256, steps=10)


ROOM_FLAGS = ("--val-size", "8", "--finetune-steps", "2")


@pytest.fixture(scope="module")
def rooms_search(rooms_ckpt, tmp_path_factory):
    return search(rooms_ckpt, tmp_path_factory.mktemp("search"), *ROOM_FLAGS)


def search(ckpt, out, *flags, nproc=1):
    """search.py's episodes and baseline rows: in this process, or under torchrun."""
    args = ["--ckpt", ckpt, "--episodes", "3", "--warmup", "2", "--batch-size", "2",
            "--max-bit", "3", "--out", str(out), *flags]
    if nproc == 1:
        search_script.main(search_script.get_args_parser().parse_args(args))
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        done = subprocess.run([sys.executable, *launcher, "search.py", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(out, "episodes.jsonl")) as f:
        episodes = [json.loads(line) for line in f]
    with open(os.path.join(out, "baselines.json")) as f:
        return episodes, json.load(f)


def test_rooms_search_scores_a_few_crops_per_point(rooms_search):
    # 8 of the val rooms' crops leave most points without a vote; the reward must not need one.
    episodes, rows = rooms_search
    assert len(episodes) == 3
    assert all(0 < e["metric"] <= 1 and e["budget_ratio"] <= 0.1 + 1e-9 for e in episodes)
    assert rows[0]["name"] == "searched (HAQ)"


def test_cls_search_with_a_small_val_size(tmp_path):
    root = tmp_path / "cls"
    write_cls(str(root), seed=0, train_shapes=3, eval_shapes=1)
    ckpt = fp32_checkpoint(str(tmp_path / "fp32.pt"), "pt_cls_tiny", "synthetic_cls",
                           str(root / "modelnet40_normal_resampled"), 128)
    episodes, _ = search(ckpt, tmp_path / "search", "--val-size", "4")
    assert len(episodes) == 3 and all(0 <= e["metric"] <= 1 for e in episodes)


def test_two_processes_score_every_episode_as_one_process(rooms_ckpt, rooms_search, tmp_path):
    # Each rank scores whole batches of the subset and the confusion matrices are summed, every
    # rank fine-tunes the same batches and takes rank 0's weights, so the metrics are equal
    # exactly (integer counts); the agent runs on rank 0 alone.
    single, single_rows = rooms_search
    ddp, ddp_rows = search(rooms_ckpt, tmp_path, *ROOM_FLAGS, nproc=2)
    assert [e["bits"] for e in ddp] == [e["bits"] for e in single]
    assert [e["metric"] for e in ddp] == [e["metric"] for e in single]
    assert [r["metric"] for r in ddp_rows] == [r["metric"] for r in single_rows]


def test_each_baseline_row_is_sized_with_its_own_method(rooms_ckpt, rooms_search):
    """A linear grid and a k-means codebook of the same width differ in size (a k-means layer
    may use fewer entries); each row's honest size is its own method's, as quantize_model and
    lib.quant.size give it for that uniform policy."""
    from lib.checkpoint import load_checkpoint
    from lib.quant import quantize_model, uniform_policy
    from lib.quant.size import honest_size_bytes
    _, rows = rooms_search
    args = search_script.get_args_parser().parse_args(["--ckpt", rooms_ckpt, *ROOM_FLAGS])
    meta, model, _ = load_checkpoint(rooms_ckpt)
    layers, evaluator = search_script.build_evaluator(args, torch.device("cpu"), meta, model)
    fixed = search_script.fixed_bits_of(args, layers)
    uniform = [row for row in rows if row["name"].startswith("uniform")]
    assert {row["method"] for row in uniform} == {"linear", "kmeans"}
    for row in uniform:
        _, model, _ = load_checkpoint(rooms_ckpt)
        bits = int(row["name"].split()[1].split("-")[0])
        quantize_model(model, dict(uniform_policy(layers, bits), **fixed), method=row["method"])
        assert row["honest_bytes"] == honest_size_bytes(model), row["name"]


def test_an_impossible_budget_stops_before_the_rewards_set_up(rooms_ckpt, tmp_path, monkeypatch):
    """The check needs the layers' sizes only: on S3DIS-size crops, collating the reward's and
    the fine-tune's batches and scoring the fp32 model first took minutes."""
    def collated(*args, **kwargs):
        raise AssertionError("batches collated before the budget was checked")
    monkeypatch.setattr(search_script, "reward_batches", collated)
    with pytest.raises(ValueError) as refused:
        search(rooms_ckpt, tmp_path / "search", "--preserve-ratio", "0.02", "--keep-first-last",
               "fp32")
    # in the flags' words, with the least ratio that holds the kept layers and --min-bit
    least = re.fullmatch(r"--preserve-ratio 0\.02 is unreachable: the smallest policy \(every "
                         r"searched layer at --min-bit 2, the first and last layers at "
                         r"--keep-first-last fp32\) takes 0\.\d+ of the fp32 weight bits; give "
                         r"--preserve-ratio (0\.\d+) or more, or a lower --min-bit or "
                         r"--keep-first-last", str(refused.value))
    assert least, str(refused.value)
    with pytest.raises(AssertionError, match="batches collated"):  # that ratio gets past the check
        search(rooms_ckpt, tmp_path / "search2", "--preserve-ratio", least[1], "--keep-first-last",
               "fp32")


@pytest.mark.parametrize("script", ["search", "finetune"])
def test_an_impossible_keep_first_last_stops_before_any_data_loads(rooms_ckpt, tmp_path,
                                                                   monkeypatch, capsys, script):
    """search.py found --keep-first-last 33 impossible only at its budget check, after the
    held-out split had loaded (minutes on S3DIS), and finetune.py --bits after both splits had:
    now the flags are refused as they are parsed, before the data folder (missing here) is
    looked at."""
    import finetune as finetune_script
    from lib.cli import run_script
    module = {"search": search_script, "finetune": finetune_script}[script]

    def load(*args, **kwargs):
        raise AssertionError("a split loaded before --keep-first-last was checked")
    monkeypatch.setattr(module, "load_split", load)
    flags = ["--ckpt", rooms_ckpt, "--keep-first-last", "33", "--data-root",
             str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        run_script(module.main, module.get_args_parser(), kind=script,
                   argv=flags + (["--bits", "4"] if script == "finetune" else []))
    assert stop.value.code == 2  # argparse's usage error, as for --min-bit 33
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --keep-first-last: 33: bit width must be within 1..32")
    assert not (tmp_path / "run").exists()


def test_a_linear_search_without_kept_layers_is_fine_tuned_as_searched(rooms_ckpt, tmp_path):
    """finetune.py takes the policy's --method, and a policy searched with --keep-first-last
    none records null, which it reads back (it took "none" for a damaged file)."""
    import finetune as finetune_script
    from lib.checkpoint import load_checkpoint
    search(rooms_ckpt, tmp_path / "search", "--val-size", "4", "--finetune-steps", "0",
           "--method", "linear", "--keep-first-last", "none")
    policy = tmp_path / "search" / "policy.json"
    record = json.loads(policy.read_text())
    assert record["method"] == "linear" and record["keep_first_last"] is None
    out = tmp_path / "searched"
    finetune_script.main(finetune_script.get_args_parser().parse_args(
        ["--ckpt", rooms_ckpt, "--policy", str(policy), "--epochs", "0", "--batch-size", "2",
         "--out", str(out)]))
    meta, _, _ = load_checkpoint(str(out / "best.pt"))
    assert meta["quant"]["method"] == "linear" and meta["args"]["method"] == "linear"
    assert meta["quant"]["bits"] == record["bits"]


def test_a_contrary_method_is_refused_before_the_data_loads(rooms_ckpt, tmp_path, monkeypatch):
    import finetune as finetune_script

    def load(*args, **kwargs):
        raise AssertionError("a split loaded before the policy's method was checked")
    monkeypatch.setattr(finetune_script, "load_split", load)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"bits": {}, "method": "linear"}))
    with pytest.raises(ValueError, match="searched with --method linear; fine-tune with the same "
                                         r"\(or leave --method out\)"):
        finetune_script.main(finetune_script.get_args_parser().parse_args(
            ["--ckpt", rooms_ckpt, "--policy", str(policy), "--method", "kmeans",
             "--out", str(tmp_path / "ft")]))


def test_a_fine_tune_records_the_kept_layers_of_its_policy(rooms_ckpt, tmp_path):
    """Without --keep-first-last the policy's bits hold the first and last layers at the width
    the search kept them at: the fine-tune's record says so (it said null, nothing kept)."""
    import finetune as finetune_script
    from lib.checkpoint import load_checkpoint
    search(rooms_ckpt, tmp_path / "search", "--val-size", "4", "--finetune-steps", "0",
           "--keep-first-last", "8")
    out = tmp_path / "searched"
    finetune_script.main(finetune_script.get_args_parser().parse_args(
        ["--ckpt", rooms_ckpt, "--policy", str(tmp_path / "search" / "policy.json"),
         "--epochs", "0", "--batch-size", "2", "--out", str(out)]))
    meta, _, _ = load_checkpoint(str(out / "best.pt"))
    assert meta["quant"]["keep_first_last"] == "8"
    assert meta["quant"]["bits"][next(iter(meta["quant"]["bits"]))] == 8


def test_a_policy_whose_bits_contradict_its_kept_layers_is_refused(rooms_ckpt, tmp_path):
    """policy.json records keep_first_last "8" but its first layer (in forward order) was edited
    to 2 bits: the fine-tune applied the 2 and recorded the layers as kept at 8."""
    import finetune as finetune_script
    from lib.checkpoint import load_checkpoint
    from lib.experiment import example_inputs
    from lib.quant import list_quantizable
    meta, model, _ = load_checkpoint(rooms_ckpt)
    val = load_split(meta["dataset"]["name"], meta["dataset"]["root"], "val",
                     meta["dataset"]["num_points"])
    names = [layer.name for layer in list_quantizable(model, example_inputs(val, "cpu"))]
    bits = dict.fromkeys(names, 4)
    bits.update({names[0]: 2, names[-1]: 8})
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"bits": bits, "keep_first_last": "8"}))
    for keep in ([], ["--keep-first-last", "8"]):  # with the flag, its 8 replaced the 2
        with pytest.raises(ValueError) as err:
            finetune_script.main(finetune_script.get_args_parser().parse_args(
                ["--ckpt", rooms_ckpt, "--policy", str(policy), "--epochs", "0",
                 "--batch-size", "2", "--out", str(tmp_path / f"ft{len(keep)}"), *keep]))
        assert str(err.value) == (f"{policy}: keep_first_last 8 says the first and last layers "
                                  f"are kept at 8 bits, but its bits hold {names[0]} at 2 bits; "
                                  f"make the two agree")


def test_a_layer_the_forward_never_calls_is_not_searched_nor_charged(tmp_path, monkeypatch,
                                                                   capsys):
    """A Linear registered beside the classifier and never called (a researcher's unused
    auxiliary head) was a search step, and its bits were charged to the budget: it is left in
    fp32, out of the policy, said once; finetune.py takes that policy (it refused one without
    a width for every layer) and eval.py scores its checkpoint."""
    import eval as eval_script
    import finetune as finetune_script
    import models
    from lib.checkpoint import load_checkpoint
    from lib.quant.layers import is_quantized_layer, n_weights, named_quantizable
    built = models.build_model

    def with_unused_head(name, **kwargs):
        model = built(name, **kwargs)
        model.aux_head = torch.nn.Linear(64, kwargs["num_classes"])  # registered last
        return model
    monkeypatch.setattr(models, "build_model", with_unused_head)
    monkeypatch.setitem(globals(), "build_model", with_unused_head)  # fp32_checkpoint's
    root = tmp_path / "cls"
    write_cls(str(root), seed=0, train_shapes=3, eval_shapes=1)
    ckpt = fp32_checkpoint(str(tmp_path / "fp32.pt"), "pt_cls_tiny", "synthetic_cls",
                           str(root / "modelnet40_normal_resampled"), 128)
    episodes, _ = search(ckpt, tmp_path / "search", "--val-size", "4", "--finetune-steps", "0",
                         "--keep-first-last", "8")
    _, model, _ = load_checkpoint(ckpt)
    sizes = {name: n_weights(layer) for name, layer in named_quantizable(model)}
    called = set(sizes) - {"aux_head"}
    policy = json.loads((tmp_path / "search" / "policy.json").read_text())
    for bits, ratio in [(e["bits"], e["budget_ratio"]) for e in episodes] + [
            (policy["bits"], policy["budget_ratio"])]:
        assert set(bits) == called
        # the budget is the called layers' fp32 bits: the unused head's are not in it
        charged = sum(sizes[name] * (32 if b is None else b) for name, b in bits.items())
        assert ratio == pytest.approx(charged / (32 * sum(sizes[name] for name in called)))
        assert ratio <= 0.1 + 1e-9
        # the input layer and the classifier the forward calls are kept, not the unused head
        assert bits["encoder.down.0.mlp.0"] == bits["head.2"] == 8
    said = "search.py: layer aux_head is never called by the forward; left in fp32"
    assert capsys.readouterr().out.splitlines().count(said) == 1

    out = tmp_path / "searched"
    finetune_script.main(finetune_script.get_args_parser().parse_args(
        ["--ckpt", ckpt, "--policy", str(tmp_path / "search" / "policy.json"), "--epochs", "0",
         "--batch-size", "2", "--out", str(out)]))
    meta, quantized, _ = load_checkpoint(str(out / "best.pt"))
    assert "aux_head" in meta["quant"]["fp32_layers"]
    assert not is_quantized_layer(quantized.aux_head)
    assert is_quantized_layer(quantized.get_submodule("head.2"))
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--ckpt", str(out / "best.pt"), "--batch-size", "2", "--json",
         str(tmp_path / "eval.json")]))
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(
        (out / "best_test.json").read_text())


def test_data_of_other_features_is_refused_before_the_search_or_the_fine_tune(tmp_path,
                                                                            monkeypatch):
    """A ModelNet checkpoint trained on normals, given the h5 form of the same data (xyz as
    features) by --data-root: eval.py refused it, but search.py rewarded every policy on those
    inputs and finetune.py trained all its epochs before its test score refused them."""
    import finetune as finetune_script
    root = tmp_path / "cls"
    write_cls(str(root), seed=0, train_shapes=3, eval_shapes=1)
    ckpt = fp32_checkpoint(str(tmp_path / "fp32.pt"), "pt_cls_tiny", "synthetic_cls",
                           str(root / "modelnet40_normal_resampled"), 128)
    h5 = str(root / "modelnet40_ply_hdf5_2048")
    with pytest.raises(ValueError, match="trained with normals as point features"):
        search(ckpt, tmp_path / "search", "--val-size", "4", "--data-root", h5)
    with pytest.raises(ValueError, match="trained with normals as point features"):
        finetune_script.main(finetune_script.get_args_parser().parse_args(
            ["--ckpt", ckpt, "--data-root", h5, "--bits", "4", "--epochs", "1",
             "--batch-size", "2", "--out", str(tmp_path / "ft")]))
    assert not (tmp_path / "search" / "policy.json").exists()
    assert not (tmp_path / "ft" / "best.pt").exists()
    from lib.haq import compare

    def rewarded(*args, **kwargs):
        raise AssertionError("lib.haq.compare scored policies before it checked the data")
    monkeypatch.setattr(compare, "PolicyEvaluator", rewarded)
    with pytest.raises(ValueError, match="trained with normals as point features"):
        compare.main(compare.get_args_parser().parse_args(
            ["--ckpt", ckpt, "--data-root", h5, "--out", str(tmp_path / "compare")]))


def test_a_classifier_is_trained_on_two_samples_a_step_at_least(tmp_path):
    """--batch-size 1 for a classifier was torch's BatchNorm error ('Expected more than 1 value
    per channel') in its first step: for search.py at its first reward fine-tune, after the
    run folder was written; it is now refused, naming the flag, before any of it."""
    import pretrain as pretrain_script
    root = tmp_path / "cls"
    write_cls(str(root), seed=0, train_shapes=3, eval_shapes=1)
    data = str(root / "modelnet40_normal_resampled")
    ckpt = fp32_checkpoint(str(tmp_path / "fp32.pt"), "pt_cls_tiny", "synthetic_cls", data, 128)
    with pytest.raises(ValueError, match="--batch-size 1: a classifier trains on at least 2"):
        search(ckpt, tmp_path / "search", "--val-size", "4", "--batch-size", "1")
    assert not (tmp_path / "search" / "args.json").exists()
    with pytest.raises(ValueError, match="--batch-size 1: a classifier trains on at least 2"):
        pretrain_script.main(pretrain_script.get_args_parser().parse_args(
            ["--model", "pt_cls_tiny", "--dataset", "synthetic_cls", "--data-root", data,
             "--num-points", "128", "--batch-size", "1", "--epochs", "1",
             "--out", str(tmp_path / "pretrain")]))


def test_the_reward_samples_digest_is_the_same_under_any_number_of_processes(monkeypatch):
    """search.py records it to refuse a resume on changed samples; each process holds every
    world-th scored batch, and a resume under another process count must find the same."""
    import types
    from lib import distributed
    batches = [{"xyz": torch.full((2, 3), float(i)), "label": torch.tensor([i, i])}
               for i in range(5)]
    fine_tune = [{"xyz": torch.ones(2, 3)}]
    one = search_script.reward_data_sha256(
        types.SimpleNamespace(eval_batches=batches, train_batches=fine_tune))
    shares = [batches[0::2], batches[1::2]]
    monkeypatch.setattr(distributed, "gather_objects",
                        lambda mine: [[search_script._batch_sha256(b) for b in share]
                                      for share in shares])
    two = search_script.reward_data_sha256(
        types.SimpleNamespace(eval_batches=shares[0], train_batches=fine_tune))
    assert one == two
    batches[3]["xyz"][0, 0] += 1e-3  # one value of one sample changed
    assert search_script.reward_data_sha256(
        types.SimpleNamespace(eval_batches=shares[0], train_batches=fine_tune)) != one
