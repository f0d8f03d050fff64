"""lib/distributed.py under two CPU processes (gloo): training through `wrap_model` equals one
process with the whole batch, and pretrain.py / finetune.py --distill / eval.py finish under
torchrun with figures that equal a single process's scoring of the same checkpoint exactly;
`python -m lib.results_table --run` scores the run folder they wrote.

What "equal" means for training: in float64 one step of the Point Transformer under 2 processes
gives the single-process gradients to 1e-12 (test_a_training_step_...). In float32 the ranks'
BatchNorm sums are added in another order; a rounding-level change flips ReLU and max-pool
kinks, so whole runs drift apart slowly: 8 steps of pretrain.py leave the parameters 0.4% apart
(relative L2) and 8 of finetune.py --distill its codebooks 0.003%; the test allows 1%. (When
each rank drew its own augmentation, before lib.data.transforms.sample_rng was keyed by
sample, the same pretrain runs ended 2.7% apart.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lib.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
SUMMARY = ("accuracy", "cat_miou", "ins_miou")


def run(*args, launcher=(sys.executable,)):
    out = subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_batchnorm_model_under_two_processes_equals_one_process(tmp_path):
    """Each rank sees half of every batch; with BatchNorm synchronised (CpuSyncBatchNorm: mean
    and variance over both halves, gradients through both) the weights, BatchNorm statistics
    and validation figures follow the single-process run up to float rounding (1e-5: the
    per-rank sums are added in another order). Unsynchronised, the statistics of half-batches
    differ and so does every step."""
    script = os.path.join(REPO, "tests", "ddp_toy_run.py")
    run(script, "--out", str(tmp_path / "single"), "--batch-size", "8", "--batchnorm")
    run(script, "--out", str(tmp_path / "ddp"), "--batch-size", "4", "--batchnorm",
        launcher=TORCHRUN)
    single = torch.load(tmp_path / "single" / "result.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "result.pt", weights_only=True)
    assert "norm.running_var" in single["state_dict"]
    tracked = "norm.num_batches_tracked"
    assert single["state_dict"][tracked] == ddp["state_dict"][tracked]
    for name, w in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], w, atol=1e-5, rtol=1e-5)
    assert ddp["val"]["miou"] == pytest.approx(single["val"]["miou"], abs=1e-6)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp", "quantized-distill"])
def test_a_training_step_under_two_processes_is_the_single_process_step(quantized, tmp_path):
    """pt_seg_tiny in float64, one fixed batch of 4 x 2048 points: the 2-process gradients
    (synchronised BatchNorm, DDP's average) are the 1-process ones, C kernels included; with
    --quantized, the 4-bit weight-shared model's codebook gradients under distillation."""
    script = os.path.join(REPO, "tests", "ddp_step_run.py")
    flags = ["--quantized"] if quantized else []
    run(script, "--out", str(tmp_path / "one.pt"), *flags)
    run(script, "--out", str(tmp_path / "two.pt"), *flags, launcher=TORCHRUN)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys()
    assert any(name.endswith("codebook") for name in one) == quantized
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, atol=1e-12, rtol=1e-9, msg=name)


def relative_distance(ckpt_a, ckpt_b):
    """|a - b| / |a| over all parameters of two checkpoints (L2)."""
    a = {k: v.detach() for k, v in load_checkpoint(ckpt_a)[1].named_parameters()}
    b = {k: v.detach() for k, v in load_checkpoint(ckpt_b)[1].named_parameters()}
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    return (diff / sum(float(a[k].double().pow(2).sum()) for k in a)) ** 0.5


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    run("-m", "lib.data.synthetic", "--out", str(root), "--only", "parts",
        "--train-shapes", "3", "--eval-shapes", "3")  # 6 categories: 18 val, 18 test shapes
    return str(root / "parts")


def evaluated(ckpt, tmp_path, split="test", launcher=(sys.executable,)):
    report = str(tmp_path / f"eval_{split}_{len(launcher)}.json")
    run("eval.py", "--ckpt", ckpt, "--split", split, "--batch-size", "4", "--json", report,
        launcher=launcher)
    with open(report) as f:
        return json.load(f)


def test_pretrain_finetune_eval_under_two_processes(tiny_parts, tmp_path):
    """18 evaluation shapes over 2 ranks in batches of 4 (5 batches, the last ragged): every
    figure the ranks merge equals one process's scoring of the same file, to the last bit."""
    pre, fine = str(tmp_path / "pretrain"), str(tmp_path / "finetune")
    run("pretrain.py", "--model", "pt_seg_tiny", "--dataset", "synthetic_parts", "--data-root",
        tiny_parts, "--num-points", "128", "--epochs", "1", "--batch-size", "3", "--out", pre,
        launcher=TORCHRUN)
    meta, _, _ = load_checkpoint(os.path.join(pre, "best.pt"))
    single_val = evaluated(os.path.join(pre, "best.pt"), tmp_path, "val")
    for key in SUMMARY:
        assert meta["metrics"][key] == single_val[key], key  # fit's sharded val pass
    assert meta["metrics"]["num_shapes"] == 18

    run("finetune.py", "--ckpt", os.path.join(pre, "best.pt"), "--bits", "4",
        "--keep-first-last", "8", "--distill", "--epochs", "1", "--batch-size", "3",
        "--out", fine, launcher=TORCHRUN)
    with open(os.path.join(fine, "best_test.json")) as f:
        final = json.load(f)  # finetune's final evaluation, on both ranks
    two = evaluated(os.path.join(fine, "best.pt"), tmp_path, launcher=TORCHRUN)

    # One command scores the run folder (pretrain/, finetune/), one process, into results.md
    # and results.json, and each checkpoint's figures into eval/<folder>.json.
    run("-m", "lib.results_table", "--run", str(tmp_path), "--batch-size", "4")
    with open(tmp_path / "eval" / "finetune.json") as f:
        single = json.load(f)
    assert final["num_shapes"] == single["num_shapes"] == two["num_shapes"] == 18
    for key in SUMMARY + ("honest_bytes",):
        assert final[key] == single[key] == two[key], key
    with open(tmp_path / "results.json") as f:
        rows = json.load(f)
    assert [row["name"] for row in rows] == ["fp32", "searched, finetune"]
    assert rows[1]["ins_miou"] == single["ins_miou"] and rows[1]["budget_ratio"] < 0.2
    with open(tmp_path / "eval" / "pretrain.json") as f:
        assert rows[0]["ins_miou"] == json.load(f)["ins_miou"]
    assert "searched, finetune" in (tmp_path / "results.md").read_text()


def test_pretrain_and_distill_under_two_processes_train_as_one_process(tiny_parts, tmp_path):
    """Batch 4 in one process against batch 2 on each of two: the same samples in the same
    steps with the same augmentation, so the runs differ by float32 rounding only (the
    tolerance is in the module docstring). 2048 points, as in ddp_step_run.py."""
    common = ["--num-points", "2048", "--epochs", "2"]
    runs = {}
    for nproc, launcher in ((1, (sys.executable,)), (2, TORCHRUN)):
        pre, fine = str(tmp_path / f"pretrain{nproc}"), str(tmp_path / f"finetune{nproc}")
        run("pretrain.py", "--model", "pt_seg_tiny", "--dataset", "synthetic_parts",
            "--data-root", tiny_parts, *common, "--batch-size", str(4 // nproc), "--out", pre,
            launcher=launcher)
        run("finetune.py", "--ckpt", os.path.join(str(tmp_path / "pretrain1"), "last.pt"),
            "--bits", "4", "--distill", *common, "--batch-size", str(4 // nproc), "--out",
            fine, launcher=launcher)
        runs[nproc] = pre, fine
    for one, two in zip(runs[1], runs[2]):
        assert relative_distance(os.path.join(one, "last.pt"), os.path.join(two, "last.pt")) < 1e-2
        logs = []
        for folder in (one, two):
            with open(os.path.join(folder, "log.jsonl")) as f:
                logs.append([json.loads(line) for line in f])
        for a, b in zip(*logs):  # the epoch's training loss is over both ranks' batches
            assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], rel=1e-2)
            assert b["val"]["ins_miou"] == pytest.approx(a["val"]["ins_miou"], abs=2e-2)


def test_a_validation_split_smaller_than_the_world_is_scored(tiny_parts, tmp_path):
    """One val shape for two ranks: rank 1 has no batch. DDP's first forward after training
    broadcasts buffers, which rank 1 would never join (a hang until torchrun's timeout); the
    evaluation takes rank 0's buffers where every rank is, and scores the plain module."""
    import shutil
    root = tmp_path / "parts"
    shutil.copytree(tiny_parts, root)
    val_list = root / "train_test_split" / "shuffled_val_file_list.json"
    val_list.write_text(json.dumps(json.loads(val_list.read_text())[:1]))
    pre = str(tmp_path / "pretrain")
    run("pretrain.py", "--model", "pt_seg_tiny", "--dataset", "synthetic_parts", "--data-root",
        str(root), "--num-points", "128", "--epochs", "1", "--batch-size", "3", "--out", pre,
        launcher=TORCHRUN)
    meta, _, _ = load_checkpoint(os.path.join(pre, "best.pt"))
    assert meta["metrics"]["num_shapes"] == 1
    single_val = evaluated(os.path.join(pre, "best.pt"), tmp_path, "val")
    for key in SUMMARY:
        assert meta["metrics"][key] == single_val[key], key


def test_one_process_on_a_numbered_gpu_makes_it_the_current_device(monkeypatch):
    """--device cuda:1 without torchrun: the current device is the one a last.pt saves the
    generator of (lib/checkpoint.rng_state); left at GPU 0, a resume set GPU 0's generator
    while the run drew on GPU 1's. (A stand-in for torch.cuda: no GPU here.)"""
    from lib import distributed
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_distributed(torch.device("cuda", 1)) == (0, 1, torch.device("cuda", 1))
    assert made_current == [torch.device("cuda", 1)]
    distributed.init_distributed(torch.device("cuda"))
    distributed.init_distributed(torch.device("cpu"))
    assert made_current == [torch.device("cuda", 1)]


def test_a_checkpoint_replaced_between_the_ranks_reads_is_scored_as_one_file(tmp_path):
    """run/eval.sh scores stages that still train: their best.pt may be replaced between two
    ranks' reads of it. Rank 0 scored the old file, rank 1 the new one, and the merged figures
    were those of neither; the ranks now read it again until they hold the same weights."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lib.checkpoint import save_checkpoint
    from lib.experiment import evaluate_checkpoint
    from tiny_checkpoints import make_checkpoint, write_tiny_data
    write_tiny_data(tmp_path, tasks=("partseg",))
    old = make_checkpoint(tmp_path / "best.pt", "partseg", tmp_path)
    meta, model, _ = load_checkpoint(old)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    new = str(tmp_path / "next.pt")
    save_checkpoint(new, model, meta)
    figures = {name: evaluate_checkpoint(path, batch_size=2)[1]
               for name, path in (("old", old), ("new", new))}
    assert figures["old"]["ins_miou"] != figures["new"]["ins_miou"]
    run(os.path.join(REPO, "tests", "ddp_replaced_eval.py"), "--ckpt", old, "--next", new,
        "--out", str(tmp_path / "two.json"), launcher=TORCHRUN)
    with open(tmp_path / "two.json") as f:
        two = json.load(f)
    for key in SUMMARY:
        assert two[key] == figures["new"][key], key


def test_a_stage_that_lands_while_the_ranks_list_a_run_is_not_a_hang(tmp_path):
    """run/eval.sh under torchrun: a stage writing its first best.pt between two ranks' listings
    of the run folder gave rank 1 one checkpoint more to score than rank 0, and the ranks waited
    on each other's collectives until gloo's timeout (30 minutes). Every rank takes rank 0's."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_checkpoints import make_checkpoint, write_tiny_data
    write_tiny_data(tmp_path / "data", tasks=("partseg",))
    for stage in ("run/pretrain", "new/searched"):
        (tmp_path / stage).mkdir(parents=True)
        make_checkpoint(tmp_path / stage / "best.pt", "partseg", tmp_path / "data")
    out = subprocess.run([*TORCHRUN, os.path.join(REPO, "tests", "ddp_run_listing.py"), "--folder",
                          str(tmp_path / "run"), "--new-stage", str(tmp_path / "new" / "searched"),
                          "--out", str(tmp_path / "rows.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "rows.json") as f:
        assert json.load(f) == ["fp32"]


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_error_one_rank_finds_is_one_line_under_torchrun(failing_rank):
    """A one-line error of one process reached the terminal with the other process's gloo
    traceback ("Connection closed by peer") after it, and not at all when rank 1 found it (only
    rank 0 prints): the waiting process now stops without a traceback, and the failing one's
    line is in torchrun's summary (its error file)."""
    out = subprocess.run([*TORCHRUN, os.path.join(REPO, "tests", "ddp_one_line_error.py"),
                          "--failing-rank", str(failing_rank)],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Connection closed by peer" not in text and "[rank" not in text, text[-3000:]
    assert "error: data/x.txt: line 3 has 2 columns, expected 7" in text
    # torchrun's summary of the failing process carries the line
    summary = text[text.index("FAILED"):]
    assert "line 3 has 2 columns" in summary, text[-3000:]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_workers_end_when_their_launcher_is_killed(tmp_path):
    """torchrun starts each worker in a session of its own: a kill -9 of the launcher (or of its
    process group) left them running, training on in a run folder whose lock then refused the
    resume. lib.distributed.end_with_launcher has the kernel end them with it."""
    launcher = subprocess.Popen([*TORCHRUN, os.path.join(REPO, "tests", "ddp_until_killed.py"),
                                 str(tmp_path)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("*.pid"))]
            time.sleep(0.1)
        assert len(pids) == 2, "the workers did not start"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "workers outlived their launcher"
    finally:
        launcher.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_rooms_voted_under_two_processes_are_one_process_predictions(tmp_path):
    """S3DIS whole-room scoring: a point's prediction is the argmax of its crops' summed
    softmax scores, and on near-even scores the order of that float sum decides it. Each rank
    summed its own crops and the ranks' sums were then added (another order), and a crop in
    another batch size gave other last bits: 2 processes predicted other classes than one
    (mIoU 0.0029477 against 0.0029445 here). Logits made near-even (the head's weights
    x 1e-6) so that the order matters, 101 crops in batches of 4 (the last one ragged)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lib.checkpoint import save_checkpoint
    from lib.data.s3dis import RoomVoter
    from lib.experiment import load_split
    from tiny_checkpoints import make_checkpoint, write_tiny_data
    write_tiny_data(tmp_path / "data", tasks=("semseg",))
    meta, model, _ = load_checkpoint(make_checkpoint(tmp_path / "made.pt", "semseg",
                                                     tmp_path / "data"))
    with torch.no_grad():
        model.head[1].weight.mul_(1e-6)
        model.head[1].bias.zero_()
    ckpt = str(tmp_path / "even.pt")
    save_checkpoint(ckpt, model, meta)

    # The case is one where the order decides: the same crops voted last-first predict
    # otherwise for some points.
    dataset = load_split("synthetic_rooms", meta["dataset"]["root"], "test", 512,
                         whole_rooms=True)
    crops = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model.eval()(crops["xyz"], crops["feat"])
    votes = []
    for order in (range(len(dataset)), reversed(range(len(dataset)))):
        voter = RoomVoter(dataset)
        for i in order:
            voter.add(crops["room"][i], crops["index"][i], logits[i])
        votes.append(torch.cat([pred for pred, _ in voter.finish()]))
    assert not torch.equal(*votes)

    figures, files = {}, {}
    for nproc, launcher in ((1, (sys.executable,)), (2, TORCHRUN)):
        folder = tmp_path / f"pred{nproc}"
        run("eval.py", "--ckpt", ckpt, "--batch-size", "4", "--save-pred", str(folder),
            "--json", str(tmp_path / f"eval{nproc}.json"), launcher=launcher)
        figures[nproc] = json.loads((tmp_path / f"eval{nproc}.json").read_text())
        files[nproc] = {path.name: path.read_bytes() for path in folder.rglob("*.ply")}
    assert len(files[1]) == 2 and files[2] == files[1]  # every point's prediction, to the bit
    assert figures[2] == figures[1]


def test_each_rank_evaluates_whole_one_process_batches(monkeypatch):
    """The evaluation sampler gives each sample the batch one process gives it: a batch's size
    changes a kernel's last bits (5 of 101 test crops of the tiny rooms got other logits when
    rank r took samples r, r + 2, ..., the ragged tail batched otherwise)."""
    from lib import distributed
    from lib.distributed import ShardedSampler
    single = [list(range(start, min(start + 4, 11))) for start in range(0, 11, 4)]
    for world in (1, 2, 3, 4):
        batches = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
            indices = list(ShardedSampler(11, shuffle=False, batch_size=4))
            batches += [indices[k:k + 4] for k in range(0, len(indices), 4)]
        assert sorted(batches) == single, world


def tiny_inputs(tmp_path):
    """A tiny part-segmentation data folder, two fp32 checkpoints of it with other weights
    (ckpt.pt, next.pt) and two policies for them (policy.json: 3 bits a layer with k-means,
    next.json: 4 bits on the linear grid)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lib.checkpoint import save_checkpoint
    from lib.experiment import example_inputs, load_split
    from lib.policy_file import write_policy
    from lib.quant import list_quantizable
    from tiny_checkpoints import make_checkpoint, write_tiny_data
    write_tiny_data(tmp_path / "data", tasks=("partseg",))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", "partseg", tmp_path / "data")
    meta, model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    save_checkpoint(str(tmp_path / "next.pt"), model, meta)
    data = meta["dataset"]
    layers = list_quantizable(model, example_inputs(load_split(data["name"], data["root"], "val",
                                                               data["num_points"]),
                                                    torch.device("cpu")))
    for name, bits, method in (("policy.json", 3, "kmeans"), ("next.json", 4, "linear")):
        write_policy(str(tmp_path / name), {"bits": {layer.name: bits for layer in layers},
                                            "method": method, "keep_first_last": None})
    return {name: str(tmp_path / name) for name in ("ckpt.pt", "next.pt", "policy.json",
                                                    "next.json")}


def replaced_run(tmp_path, script, replace, *argv):
    """ddp_replaced_input.py: `script` under torchrun, each (FILE, NEXT) of `replace` put in
    place between the ranks' first reads of FILE. Returns {where: [each rank's model hash]}."""
    digests = str(tmp_path / f"{script}_digests.json")
    run(os.path.join(REPO, "tests", "ddp_replaced_input.py"), "--digests", digests,
        *[arg for pair in replace for arg in ("--replace", *pair)], script, "--", *argv,
        launcher=TORCHRUN)
    with open(digests) as f:
        return json.load(f)


def weights_hash(path):
    from lib.checkpoint import tensors_sha256
    return tensors_sha256(load_checkpoint(path)[1].state_dict().items())


def test_a_search_whose_checkpoint_is_replaced_between_the_ranks_reads_searches_one_model(
        tmp_path):
    """search.py under torchrun: each rank loaded --ckpt itself, and a pretraining writing its
    next best.pt between two ranks' reads gave rank 0 the old model and rank 1 the new one; every
    reward merged the scores of two models, and the recorded SHA-256 was rank 0's read's. The
    ranks now read it again until all hold the same file, and record that file's SHA-256."""
    from lib.checkpoint import file_sha256
    files = tiny_inputs(tmp_path)
    new_weights, new_sha256 = weights_hash(files["next.pt"]), file_sha256(files["next.pt"])
    out = tmp_path / "search"
    digests = replaced_run(tmp_path, "search", [(files["ckpt.pt"], files["next.pt"])],
                           "--ckpt", files["ckpt.pt"], "--episodes", "1", "--warmup", "1",
                           "--val-size", "4", "--finetune-steps", "0", "--max-bit", "3",
                           "--batch-size", "2", "--out", str(out))
    assert digests["rewarded"] == [new_weights, new_weights]
    with open(out / "policy.json") as f:
        assert json.load(f)["checkpoint_sha256"] == new_sha256


@pytest.mark.parametrize("replaced", ["ckpt", "policy"])
def test_a_fine_tune_whose_input_is_replaced_between_the_ranks_reads_trains_one_model(
        tmp_path, replaced):
    """finetune.py under torchrun: each rank read --ckpt (the student's source and the
    --distill teacher) and --policy itself, the policy twice (its method, then its bits). A
    pretraining writing its next best.pt between two ranks' reads gave them other teachers and
    students; a search writing its policy.json, other weight sharings (rank 0 recorded k-means
    where the policy now said linear). The ranks now read each until all hold the same file, and
    record that one."""
    from lib.checkpoint import checkpoint_meta, file_sha256
    from lib.policy_file import PolicyFile
    files = tiny_inputs(tmp_path)
    source = files["next.pt"] if replaced == "ckpt" else files["ckpt.pt"]
    policy = files["next.json"] if replaced == "policy" else files["policy.json"]
    replace = ([(files["ckpt.pt"], files["next.pt"])] if replaced == "ckpt"
               else [(files["policy.json"], files["next.json"])])
    weights, sha256 = weights_hash(source), file_sha256(source)  # before the files move
    policy = PolicyFile(policy)
    out = tmp_path / "finetune"
    digests = replaced_run(tmp_path, "finetune", replace, "--ckpt", files["ckpt.pt"], "--policy",
                           files["policy.json"], "--distill", "--epochs", "1", "--batch-size",
                           "2", "--out", str(out))
    assert digests["teacher"] == [weights, weights]
    assert len(set(digests["student"])) == 1
    quant = checkpoint_meta(str(out / "best.pt"))["quant"]
    assert quant["teacher_sha256"] == sha256
    assert quant["policy_digest"] == policy.digest and quant["method"] == policy.method()
