"""Fault drills (issue #14): what a user can do to a run folder by mistake or by bad luck, each
reproduced here on a tiny synthetic run. The scripts run in this process through their entry
point (`run_script`, as `python X.py` runs them); a crash is an exception raised right after a
checkpoint file lands (nothing after it runs, as after kill -9), and one drill kills a real
process with os._exit."""
import fcntl
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch

from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.cli import one_line, resumed_args, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND = {"pretrain": "pretrain", "finetune": "finetune", "search": "search", "eval": None}


def run(script, *argv):
    module = importlib.import_module(script)
    run_script(module.main, module.get_args_parser(), KIND[script], [str(a) for a in argv])


def refused(script, *argv):
    """The one-line message a script stops with."""
    with pytest.raises(SystemExit) as stop:
        run(script, *argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


class Crash(BaseException):
    """Stands for kill -9 right after a write: not an Exception, so nothing handles it."""


@contextmanager
def writes_into(folder, crash_at=None):
    """Counts the files atomically written into `folder` but args.json (written at each start,
    before anything a resume goes on from); raises Crash right after the `crash_at`-th. Yields
    the list of written names."""
    real_replace, written = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        if (os.path.dirname(os.path.abspath(dst)) == str(folder)
                and os.path.basename(dst) != "args.json"):
            written.append(os.path.basename(dst))
            if len(written) == crash_at:
                raise Crash
    with mock.patch("os.replace", replace):
        yield written


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lib.data.synthetic import get_args_parser, main
    root = tmp_path_factory.mktemp("synthetic")
    main(get_args_parser().parse_args(["--out", str(root), "--only", "parts",
                                       "--train-shapes", "2", "--eval-shapes", "1"]))
    return root / "parts"  # 12 train, 6 val, 6 test shapes


def pretrain_args(data, out, *extra):
    return ("--data-root", data, "--num-points", 64, "--batch-size", 4, "--epochs", 2,
            "--lr", 0.01, "--out", out, *extra)


def finetune_args(teacher, out):
    return ("--ckpt", teacher, "--bits", 3, "--keep-first-last", 8, "--distill", "--epochs", 2,
            "--lr", 1e-3, "--batch-size", 4, "--out", out)


def search_args(teacher, out):
    return ("--ckpt", teacher, "--episodes", 2, "--warmup", 1, "--val-size", 4, "--max-bit", 3,
            "--batch-size", 4, "--out", out)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted runs of the three scripts, and the files each wrote, in order. pretrain is
    given a relative --data-root, which must be recorded absolute."""
    root = tmp_path_factory.mktemp("reference")
    runs = {name: root / name for name in ("pretrain", "finetune", "search")}
    here = os.getcwd()
    os.chdir(data.parent)
    try:
        with writes_into(runs["pretrain"]) as written:
            run("pretrain", *pretrain_args(data.name, runs["pretrain"]))
    finally:
        os.chdir(here)
    writes = {"pretrain": written}
    teacher = runs["pretrain"] / "best.pt"
    for name, args in (("finetune", finetune_args), ("search", search_args)):
        with writes_into(runs[name]) as written:
            run(name, *args(teacher, runs[name]))
        writes[name] = written
    return runs, writes


def same_files(a, b, names):
    for name in names:
        meta_a, model_a, resume_a = load_checkpoint(str(a / name))
        meta_b, model_b, resume_b = load_checkpoint(str(b / name))
        assert meta_a["epoch"] == meta_b["epoch"] and meta_a["metrics"] == meta_b["metrics"], name
        for (key, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
            assert torch.equal(x, y), (name, key)
        assert (resume_a is None) == (resume_b is None)


def log_lines(path):
    """The log's records without their timings."""
    records = []
    with open(path) as f:
        for line in f:
            record = {k: v for k, v in json.loads(line).items() if k != "time"}
            if "train" in record:
                record["train"] = {k: v for k, v in record["train"].items() if k != "steps_per_s"}
            records.append(record)
    return records


# --- a run folder holds one run ----------------------------------------------------------------

def test_a_folder_whose_run_saved_nothing_is_started_again(data, tmp_path, capsys):
    """A run stopped before its first checkpoint (an error in its first epoch, a kill) leaves
    args.json and its logs: the same command was refused ('already holds a run ... replace it
    with --overwrite'), though nothing of it could be lost; the run scripts started it again."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "log.txt").write_text("error: the first try's\n")
    run("pretrain", *pretrain_args(data, out, "--epochs", 1))
    assert "its run saved nothing (args.json, no checkpoint); starting again" in \
        capsys.readouterr().out
    assert (out / "best.pt").is_file() and "first try" not in (out / "log.txt").read_text()


def test_a_new_run_refuses_a_folder_that_holds_one(reference, data):
    runs, _ = reference
    before = {p: p.read_bytes() for p in runs["pretrain"].iterdir() if p.is_file()}
    message = refused("pretrain", *pretrain_args(data, runs["pretrain"]))
    assert "already holds a run" in message and str(runs["pretrain"]) in message
    teacher = runs["pretrain"] / "best.pt"
    assert "which this run reads (--ckpt)" in refused("search", *search_args(teacher,
                                                                           runs["pretrain"]))
    assert before == {p: p.read_bytes() for p in runs["pretrain"].iterdir() if p.is_file()}


def test_a_fine_tune_that_trained_nothing_is_not_offered_to_resume(tmp_path):
    """A folder holding an --epochs 0 fine-tune (its last.pt packed, without an optimizer
    state) is refused as holding a run, without the advice to continue it with --resume, which
    that run then refused ('holds no optimizer state to resume from')."""
    from lib.quant.pack import MAGIC
    out = tmp_path / "searched"
    out.mkdir()
    (out / "args.json").write_text("{}")
    for name in ("last.pt", "best.pt"):
        (out / name).write_bytes(MAGIC + bytes(64))
    message = refused("pretrain", "--out", out)
    assert "already holds a run" in message and "--resume" not in message
    (out / "last.pt").unlink()
    (out / "search_state.pt").write_bytes(b"")
    assert "continue it with --resume" in refused("pretrain", "--out", out)


def test_overwrite_replaces_the_run_instead_of_mixing_two(reference, data, tmp_path):
    runs, _ = reference
    out = tmp_path / "run"
    shutil.copytree(runs["pretrain"], out)
    (out / "notes.txt").write_text("mine")
    run("pretrain", *pretrain_args(data, out, "--overwrite"), "--epochs", 1)
    assert len(log_lines(out / "log.jsonl")) == 1  # not the old run's two lines plus one
    assert load_checkpoint(str(out / "last.pt"))[0]["epoch"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files go


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("script", ["pretrain", "finetune", "search"])
def test_overwrite_refused_by_a_later_check_leaves_the_old_run_whole(reference, data, tmp_path,
                                                                    script):
    """--overwrite removes the old run at the new one's first write, after every input has
    loaded: a batch too large, a policy file that is not there, a budget no policy meets."""
    runs, _ = reference
    out = tmp_path / "run"
    shutil.copytree(runs[script], out)
    before = files_of(out)
    teacher = runs["pretrain"] / "best.pt"
    if script == "pretrain":
        message = refused("pretrain", *pretrain_args(data, out, "--overwrite"),
                          "--batch-size", 64)
        assert "--batch-size 64 is larger" in message
    elif script == "finetune":
        message = refused("finetune", "--ckpt", teacher, "--policy", tmp_path / "polcy.json",
                          "--epochs", 1, "--out", out, "--overwrite")
        assert "polcy.json: no such file (given as --policy)" in message
    else:
        # checked once the model is built (a bad --keep-first-last now stops the parser)
        message = refused("search", *search_args(teacher, out), "--preserve-ratio", 0.001,
                          "--overwrite")
        assert "--preserve-ratio 0.001 is unreachable" in message
    assert files_of(out) == before


@pytest.mark.parametrize("script", ["finetune", "search"])
def test_a_run_refuses_the_folder_of_a_file_it_reads(reference, tmp_path, script):
    """Even with --overwrite: the checkpoint to search, the policy to fine-tune."""
    runs, _ = reference
    out = tmp_path / "run"
    shutil.copytree(runs["search"] if script == "finetune" else runs["pretrain"], out)
    before = files_of(out)
    if script == "search":
        message = refused("search", *search_args(out / "best.pt", out), "--overwrite")
        assert "holds best.pt, which this run reads (--ckpt)" in message
    else:
        message = refused("finetune", "--ckpt", runs["pretrain"] / "best.pt", "--policy",
                          out / "policy.json", "--epochs", 1, "--out", out, "--overwrite")
        assert "holds policy.json, which this run reads (--policy)" in message
    assert files_of(out) == before


@pytest.mark.parametrize("problem, flags, expected", [
    ("checkpoint", (), "searched on another model than"),
    ("keep", ("--keep-first-last", "fp32"), "searched with the first and last layers not kept"),
    ("layers", (), "layers the model's forward calls have no bit width: "),
    ("bad keep", (), 'keep_first_last "abc" is not a bit width'),
])
def test_a_policy_the_fine_tune_refuses_is_refused_before_the_splits_load(
        reference, tmp_path, monkeypatch, problem, flags, expected):
    """The train and val splits take minutes to load on S3DIS: a policy searched on another
    checkpoint, with another --keep-first-last, without a width for one of the model's layers,
    or recording no valid --keep-first-last is refused before them, as a --method that
    contradicts it is."""
    import finetune
    from lib.checkpoint import file_sha256
    from lib.policy_file import write_policy
    from lib.quant.layers import named_quantizable
    runs, _ = reference
    teacher = runs["pretrain"] / "best.pt"
    names = [name for name, _ in named_quantizable(load_checkpoint(str(teacher))[1])]
    record = {"bits": {name: 3 for name in names}, "keep_first_last": None,
              "checkpoint": str(teacher), "checkpoint_sha256": file_sha256(str(teacher))}
    if problem == "checkpoint":
        record["checkpoint_sha256"] = "0" * 64
    elif problem == "layers":
        del record["bits"][names[-1]]
    elif problem == "bad keep":
        record["keep_first_last"] = "abc"
    write_policy(str(tmp_path / "policy.json"), record)

    def no_splits(*args, **kwargs):
        raise AssertionError("the splits were loaded before the policy was checked")
    monkeypatch.setattr(finetune, "load_split", no_splits)
    message = refused("finetune", "--ckpt", teacher, "--policy", tmp_path / "policy.json",
                      *flags, "--out", tmp_path / "run")
    assert expected in message and "policy.json" in message


def test_a_missing_checkpoint_is_refused_before_the_folder_is_made(tmp_path):
    out = tmp_path / "new"
    message = refused("search", "--ckpt", tmp_path / "bestt.pt", "--out", out)
    assert "bestt.pt: no such file (given as --ckpt)" in message
    assert not out.exists()


def test_a_run_refused_after_its_claim_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "new"
    message = refused("pretrain", "--dataset", "shapenet_part", "--data-root",
                      tmp_path / "no_such_data", "--out", out)
    assert "no_such_data" in message
    assert not out.exists()
    # nor the parent folders made for it (RUN=runs/a of a run script: runs/a/pretrain)
    message = refused("pretrain", "--dataset", "shapenet_part", "--data-root",
                      tmp_path / "no_such_data", "--out", tmp_path / "runs" / "a" / "pretrain")
    assert sorted(os.listdir(tmp_path)) == []


def test_a_model_for_another_task_than_the_data_leaves_no_folder(data, tmp_path):
    """It stopped with SystemExit, past run_script's clean-up: a folder holding only its lock
    stayed, and the message lacked "error: "."""
    message = refused("pretrain", *pretrain_args(data, tmp_path / "runs" / "cls"), "--model",
                      "pt_cls_tiny")
    assert "model pt_cls_tiny is for cls but the dataset is a partseg dataset" in message
    assert sorted(os.listdir(tmp_path)) == []


def test_a_temporary_file_left_by_a_killed_write_goes_at_the_next_claim(reference, tmp_path):
    runs, _ = reference
    out = tmp_path / "run"
    shutil.copytree(runs["pretrain"], out)
    (out / ".tmp-abc123last.pt").write_bytes(b"half a checkpoint")
    run("pretrain", "--resume", out, "--epochs", 3)
    assert not list(out.glob(".tmp-*"))


def test_finetune_refuses_to_write_where_its_teacher_lives(reference):
    runs, _ = reference
    teacher = runs["pretrain"] / "best.pt"
    before = teacher.read_bytes()
    message = refused("finetune", *finetune_args(teacher, runs["pretrain"]))
    assert "holds best.pt, which this run reads (--ckpt)" in message
    assert teacher.read_bytes() == before


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a") as holder:  # another run, alive
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("process 4242 on elsewhere\n")
        holder.flush()
        message = refused("pretrain", *pretrain_args(data, out))
    assert "in use by process 4242 on elsewhere" in message
    assert sorted(os.listdir(out)) == [".lock"]


def test_a_killed_run_leaves_no_lock_behind_in_its_living_workers(tmp_path):
    """A run holding its folder forks a child (as a DataLoader worker is) and is killed with
    kill -9; the child lives on (workers notice their parent's death seconds later, or never
    when stuck). The folder is free at once: the child held a copy of the lock, so a resume was
    refused as "in use by" the dead process."""
    from lib.rundir import lock_holder
    out = tmp_path / "killed"
    # the parent is killed once the child runs (fork's handlers done), as a run is killed
    # long after its workers started: under load the child was not yet scheduled
    driver = ("import os, sys, time\n"
              "from lib.rundir import claim\n"
              "claim(sys.argv[1])\n"
              "started, tell = os.pipe()\n"
              "if os.fork() == 0:\n"
              "    os.write(tell, b'x')\n"
              "    time.sleep(60)\n"
              "    os._exit(0)\n"
              "os.read(started, 1)\n"
              "print(flush=True)\n"
              "os.kill(os.getpid(), 9)\n")
    killed = subprocess.Popen([sys.executable, "-c", driver, str(out)], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        killed.stdout.readline()
        assert killed.wait(timeout=60) == -9
        assert lock_holder(str(out)) is None
    finally:
        try:
            os.killpg(killed.pid, 9)  # the child, still sleeping
        except ProcessLookupError:
            pass


def test_resuming_a_folder_whose_run_has_saved_nothing_yet_names_the_run(tmp_path):
    """Not "a folder without last.pt": the run is alive, before its first save."""
    from lib.rundir import recorded_run
    out = tmp_path / "busy"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without last.pt or search_state.pt"):
        recorded_run(str(out))
    with open(out / ".lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("process 4242 on elsewhere\n")
        holder.flush()
        with pytest.raises(ValueError, match="in use by process 4242 on elsewhere, which has "
                                             "saved nothing to resume yet"):
            recorded_run(str(out))
    with pytest.raises(FileNotFoundError):  # that run ended (or died) without a save
        recorded_run(str(out))


def test_a_stage_whose_folder_a_live_process_holds_is_still_running(reference, tmp_path):
    """The launcher of a torchrun killed with kill -9, its workers still training: the folder
    looks interrupted, and the run scripts offered to resume it, which the lock then refused
    ("in use by"). A live process holding the folder's lock (as a run does, lib/rundir.lock) makes
    it "still running", naming the process, for the run scripts and the results table; once the
    process is gone the same folder is interrupted again."""
    from lib.results_table import stage_problems
    from lib.stage_status import progress, stage_status
    runs, _ = reference
    out = tmp_path / "pretrain"
    shutil.copytree(runs["pretrain"], out)
    os.remove(out / "best.pt")  # killed between last.pt and best.pt: interrupted
    argv = ["--out", str(out)]
    assert progress(str(out)).state == "interrupted"
    assert stage_status(str(out), "pretrain", argv) == f"resume {out / 'last.pt'}"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom lib.rundir import lock\nlock(sys.argv[1])\n"
                               "print(flush=True)\ntime.sleep(120)\n", str(out)],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                              stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the lock
        running = f"still running as process {holder.pid} on {os.uname().nodename}"
        assert progress(str(out))[:3] == ("running", None, running)
        said = stage_status(str(out), "pretrain", argv)
        assert said.startswith(f"refuse {out}: {running}, which holds its .lock; wait"), said
        assert stage_problems(str(out), str(out / "last.pt"), None) == [f"unfinished: {running}"]
        # the run scripts stop there (a search does not read the pretraining either)
        for script in ("pretrain.sh", "search.sh"):
            ran = subprocess.run(["bash", f"run/{script}"], cwd=REPO, capture_output=True,
                                 text=True, timeout=120,
                                 env=dict(os.environ, DRY_RUN="1", RUN=str(tmp_path)))
            assert ran.returncode == 2 and not ran.stdout.strip(), (script, ran.stdout)
            assert ran.stderr.strip().splitlines()[-1] == f"[run] {said[len('refuse '):]}"
    finally:
        holder.kill()
        holder.wait()
    assert progress(str(out)).state == "interrupted"
    assert stage_status(str(out), "pretrain", argv) == f"resume {out / 'last.pt'}"


def test_out_naming_a_file_is_refused_before_any_work(data, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep")
    with mock.patch("lib.experiment.load_split", side_effect=AssertionError("loaded data")):
        assert "is a file" in refused("pretrain", *pretrain_args(data, target))
    assert target.read_text() == "keep"


# --- one resume contract -----------------------------------------------------------------------

def test_resume_refuses_changed_settings_and_lists_them(reference):
    runs, _ = reference
    message = refused("pretrain", "--resume", runs["pretrain"] / "last.pt", "--lr", 0.5,
                      "--optimizer", "sgd")
    assert "--lr 0.5 (recorded 0.01)" in message and "--optimizer sgd (recorded adamw)" in message
    message = refused("search", "--resume", runs["search"], "--min-bit", 3)
    assert "--min-bit 3 (recorded 2)" in message
    message = refused("finetune", "--resume", runs["finetune"] / "last.pt", "--out",
                      runs["search"])
    assert "the run's folder is" in message


def test_resume_may_change_how_the_run_executes(reference):
    """--workers, --device and --cuda-graphs (the same kernels, replayed) may change; the
    recorded settings stay, and a changed one beside them is still refused alone."""
    runs, _ = reference
    parser = importlib.import_module("pretrain").get_args_parser()
    argv = ["--resume", str(runs["pretrain"] / "last.pt"), "--no-cuda-graphs", "--workers", "1"]
    args = resumed_args(parser, argv, parser.parse_args(argv), "pretrain")
    assert args.cuda_graphs is False and args.workers == 1 and args.lr == 0.01
    message = refused("pretrain", *argv, "--lr", 0.5)
    assert "--lr 0.5 (recorded 0.01)" in message and "cuda-graphs" not in message.split("(only")[0]


def test_resume_refuses_fewer_epochs_or_episodes_than_done(reference):
    """Fewer would run nothing and record the smaller number: refused, as any change."""
    runs, _ = reference
    message = refused("pretrain", "--resume", runs["pretrain"], "--epochs", 1)
    assert "--epochs 1 (the run is set to 2 and has done 2; extend it with more" in message
    message = refused("search", "--resume", runs["search"], "--episodes", 1)
    assert "--episodes 1 (the run is set to 2 and has done 2" in message
    assert "(only --episodes, --device, --workers may change)" in message  # search's own flags


def test_resume_refuses_fewer_epochs_than_set_even_when_more_than_done(reference, tmp_path):
    """A run set to 3 epochs, killed after 2, resumed with --epochs 2: it trained nothing,
    recorded 2 where its last.pt said 3, and a run script would resume it forever."""
    from lib.checkpoint import torch_save_atomic
    runs, _ = reference
    shutil.copytree(runs["pretrain"], tmp_path / "pretrain")
    last = torch.load(tmp_path / "pretrain" / "last.pt", weights_only=True)
    last["meta"]["args"]["epochs"] = 3
    torch_save_atomic(last, str(tmp_path / "pretrain" / "last.pt"))
    message = refused("pretrain", "--resume", tmp_path / "pretrain", "--epochs", 2)
    assert "--epochs 2 (the run is set to 3 and has done 2; extend it with more" in message


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_resume_under_another_process_count_is_refused(reference, monkeypatch, script):
    """--batch-size is per process: a 2-process run resumed in one process trained on at half
    the total batch, twice the steps per epoch, and its schedule never reached its end."""
    runs, _ = reference
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets them
    monkeypatch.setenv("RANK", "0")
    message = refused(script, "--resume", runs[script] / "last.pt")
    assert "2 process(es) (recorded 1; the batch is per process" in message


def test_a_world_size_exported_in_the_shell_is_no_process_count(reference, monkeypatch,
                                                                tmp_path):
    """A plain `python pretrain.py --resume` runs alone whatever WORLD_SIZE the shell exports
    (torchrun sets RANK beside it): that WORLD_SIZE was counted, so a one-process run was
    refused ("2 process(es) (recorded 1") and a two-process one was let through to train alone."""
    from lib.checkpoint import torch_save_atomic
    runs, _ = reference
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    parser = importlib.import_module("pretrain").get_args_parser()
    argv = ["--resume", str(runs["pretrain"] / "last.pt")]
    assert resumed_args(parser, argv, parser.parse_args(argv), "pretrain").out == \
        str(runs["pretrain"])
    shutil.copytree(runs["pretrain"], tmp_path / "pretrain")
    last = torch.load(tmp_path / "pretrain" / "last.pt", weights_only=True)
    last["meta"]["args"]["processes"] = 2
    torch_save_atomic(last, str(tmp_path / "pretrain" / "last.pt"))
    message = refused("pretrain", "--resume", tmp_path / "pretrain")
    assert "1 process(es) (recorded 2; the batch is per process" in message


def test_a_finished_stage_is_skipped_under_another_process_count(reference, monkeypatch):
    """Started again with NPROC=2 after a one-process run, a finished stage (which then trains
    nothing) was refused on its process count; extending it still is."""
    from lib.stage_status import stage_status
    runs, _ = reference
    monkeypatch.setenv("WORLD_SIZE", "2")
    folder = str(runs["pretrain"])
    assert stage_status(folder, "pretrain", ["--out", folder]) == "finished"
    said = stage_status(folder, "pretrain", ["--out", folder, "--epochs", "3"])
    assert said.startswith("refuse ") and "2 process(es) (recorded 1" in said, said


def test_a_finished_stage_is_skipped_under_the_run_scripts_batch_for_another_nproc(reference,
                                                                                   monkeypatch):
    """run/*.sh give each process the recipe's total batch / NPROC: started again with NPROC=2
    after a one-process run, a finished stage got half its recorded --batch-size and was
    refused on it ("--batch-size 2 (recorded 4)") where it was to be skipped; another total
    batch is still refused, and an interrupted or extended stage on its process count."""
    from lib.stage_status import stage_status
    runs, _ = reference
    monkeypatch.setenv("WORLD_SIZE", "2")
    for script in ("pretrain", "finetune"):
        folder = str(runs[script])
        assert stage_status(folder, script, ["--out", folder, "--batch-size", "2"]) == "finished"
        said = stage_status(folder, script, ["--out", folder, "--batch-size", "3"])
        assert said.startswith("refuse ") and "--batch-size 3 (recorded 4)" in said, said
        said = stage_status(folder, script, ["--out", folder, "--batch-size", "2", "--epochs", "3"])
        assert said.startswith("refuse ") and "2 process(es) (recorded 1" in said, said


@pytest.mark.parametrize("script", ["finetune", "search"])
def test_a_resumed_run_refuses_a_checkpoint_that_changed_under_it(reference, tmp_path, script):
    """Its indices and codebooks (finetune), its replay buffer's rewards (search) came from the
    model it started from; another model at the same path is refused, not taken silently."""
    runs, _ = reference
    teacher = tmp_path / "pretrain" / "best.pt"
    shutil.copytree(runs["pretrain"], teacher.parent)
    out = tmp_path / script
    args = (finetune_args if script == "finetune" else search_args)(teacher, out)
    with pytest.raises(Crash), writes_into(out, crash_at=1):
        run(script, *args)
    meta, model, _ = load_checkpoint(str(teacher))
    next(model.parameters()).data.mul_(1.5)  # another model, a valid checkpoint
    save_checkpoint(str(teacher), model, meta)
    message = refused(script, "--resume", out)
    assert f"{teacher}: changed since this run started" in message


def test_a_run_resumed_on_changed_data_is_refused(data, tmp_path):
    """--data-root is compared as a path: the same folder with shapes taken out of the training
    list (fewer steps an epoch, the schedule's end moved) or with its val list gone (a tenth of
    train validates instead, and best.pt's choice compares scores on two splits) was trained on
    silently. Nothing in the run's folder changes."""
    root = tmp_path / "parts"
    shutil.copytree(data, root)
    out = tmp_path / "run"
    run("pretrain", *pretrain_args(root, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    lists = root / "train_test_split"
    train = json.loads((lists / "shuffled_train_file_list.json").read_text())
    (lists / "shuffled_train_file_list.json").write_text(json.dumps(train[:8]))
    message = refused("pretrain", "--resume", out, "--epochs", 3)
    assert "the run's data changed since it started: 2 training steps an epoch (recorded 3" \
        in message, message
    (lists / "shuffled_train_file_list.json").write_text(json.dumps(train))
    (lists / "shuffled_val_file_list.json").unlink()
    message = refused("pretrain", "--resume", out, "--epochs", 3)
    assert "changed since it started: other validation split" in message, message
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def write_family(family, root):
    """A tiny training set of each reader family and the pretrain flags for it: ShapeNet part
    (v0_normal), ModelNet (normal_resampled), S3DIS (the raw release; a fixed epoch length,
    since a room's cells set the default one and a changed room would change the steps)."""
    from lib.data import synthetic
    from lib.data.synthetic_rooms import write_rooms
    if family == "parts":
        synthetic.write_parts(root, seed=0, train_shapes=2, eval_shapes=1)
        return ("--dataset", "synthetic_parts", "--data-root", root)
    if family == "cls":
        synthetic.write_cls(root, seed=0, train_shapes=3, eval_shapes=1)
        return ("--model", "pt_cls_tiny", "--dataset", "synthetic_cls",
                "--data-root", root / "modelnet40_normal_resampled")
    write_rooms(str(root), seed=0, rooms_per_area=2, points_per_m2=30.0)
    return ("--model", "pt_semseg_tiny", "--dataset", "synthetic_rooms", "--data-root", root,
            "--samples-per-epoch", 8)


@pytest.mark.parametrize("family", ["parts", "cls", "rooms"])
def test_a_run_resumed_on_replaced_training_files_is_refused(family, tmp_path):
    """The training split was compared by its steps an epoch only: a training file replaced by
    another of another size (as many files as before) was trained on silently. The run records
    its training files' sizes (train_files_sha256, and the listing in last.pt's resume state),
    and a resume on other ones is refused in one line naming one; untouched, it resumes; a
    checkpoint written before the record resumes, not compared. Nothing in the folder changes."""
    from lib.data import build_dataset, file_listing
    data_args = write_family(family, tmp_path / family)
    out = tmp_path / "run"
    run("pretrain", *data_args, "--num-points", 64, "--batch-size", 4, "--epochs", 1,
        "--lr", 0.01, "--out", out)
    run("pretrain", "--resume", out, "--epochs", 2)  # untouched
    name, root = (data_args[data_args.index(flag) + 1] for flag in ("--dataset", "--data-root"))
    files = file_listing(build_dataset(name, root, "train"))
    # the smallest and the largest file of one folder (a shape's labels fit its category)
    folder = [entry for entry in files if os.path.dirname(entry[0]) == os.path.dirname(files[0][0])]
    small, large = (pick(folder, key=lambda entry: entry[1]) for pick in (min, max))
    (root / small[0]).write_bytes((root / large[0]).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    message = refused("pretrain", "--resume", out, "--epochs", 3)
    assert (f"the run's data changed since it started: the training split's files (1 file "
            f"differs of the {len(files)} recorded, e.g. {small[0]} now {large[1]} bytes "
            f"(recorded {small[1]} bytes))") in message, message
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    last = torch.load(out / "last.pt", weights_only=True)  # as written before the record
    del last["meta"]["dataset"]["train_files_sha256"], last["resume"]["train_files"]
    torch.save(last, out / "last.pt")
    run("pretrain", "--resume", out, "--epochs", 3)


def test_a_fine_tune_resumed_on_replaced_training_files_is_refused(tmp_path):
    """As a pretraining (above): a fine-tune records its own training files and a resume on
    other ones is refused in one line, its folder untouched."""
    from lib.data import build_dataset, file_listing
    data_args = write_family("parts", tmp_path / "parts")
    teacher = tmp_path / "pretrain"
    run("pretrain", *data_args, "--num-points", 64, "--batch-size", 4, "--epochs", 1,
        "--lr", 0.01, "--out", teacher)
    out = tmp_path / "finetune"
    run("finetune", "--ckpt", teacher / "best.pt", "--bits", 4, "--num-points", 64,
        "--batch-size", 4, "--epochs", 1, "--out", out)
    run("finetune", "--resume", out, "--epochs", 2)  # untouched
    root = tmp_path / "parts"
    files = file_listing(build_dataset("synthetic_parts", root, "train"))
    folder = [entry for entry in files if os.path.dirname(entry[0]) == os.path.dirname(files[0][0])]
    small, large = (pick(folder, key=lambda entry: entry[1]) for pick in (min, max))
    (root / small[0]).write_bytes((root / large[0]).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    message = refused("finetune", "--resume", out, "--epochs", 3)
    assert f"the training split's files (1 file differs of the {len(files)} recorded" in message
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_a_search_resumed_on_changed_samples_is_refused(reference, data, tmp_path):
    """The rewards of a resumed search are measured on the samples of the episodes before it:
    the data folder's shapes changed in place (another point set, same names) were searched on
    silently, the replayed rewards mixed with the new ones. Nothing in the folder changes."""
    runs, _ = reference
    root = tmp_path / "parts"
    shutil.copytree(data, root)
    out = tmp_path / "search"
    run("search", *search_args(runs["pretrain"] / "best.pt", out), "--data-root", root)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for shape in root.glob("*/*.txt"):  # every shape moved by 1 cm along x
        points = np.loadtxt(shape, ndmin=2)
        points[:, 0] += 0.01
        np.savetxt(shape, points, fmt="%.6f")
    message = refused("search", "--resume", out, "--episodes", 3)
    assert "the samples its rewards are measured on changed since the search started" \
        in message, message
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_resume_of_another_kind_of_run_is_one_line(reference):
    runs, _ = reference
    assert "a finetune run" in refused("pretrain", "--resume", runs["finetune"] / "last.pt")
    assert "a pretrain run" in refused("finetune", "--resume", runs["pretrain"] / "last.pt")
    assert "a pretrain run" in refused("search", "--resume", runs["pretrain"])
    assert "no optimizer state" in refused("pretrain", "--resume", runs["pretrain"] / "best.pt")


def test_resume_writes_into_the_checkpoints_folder_and_may_extend(reference, tmp_path, capsys):
    """An archived copy resumed with more epochs continues in the copy; the original run, whose
    folder the copy's checkpoint still records, is not touched."""
    runs, _ = reference
    archive = tmp_path / "archive"
    shutil.copytree(runs["pretrain"], archive)
    before = {p.name: p.read_bytes() for p in runs["pretrain"].iterdir() if p.is_file()}
    run("pretrain", "--resume", archive, "--epochs", 3)
    assert f"writing into {archive}" in capsys.readouterr().out
    assert load_checkpoint(str(archive / "last.pt"))[0]["epoch"] == 3
    assert [line["epoch"] for line in log_lines(archive / "log.jsonl")] == [1, 2, 3]
    assert before == {p.name: p.read_bytes() for p in runs["pretrain"].iterdir() if p.is_file()}


# --- kill at every checkpoint write --------------------------------------------------------------

@pytest.mark.parametrize("script, points", [
    ("pretrain", None),
    ("finetune", [1]),  # after last.pt of epoch 1, before its best.pt
    ("search", [1]),  # after the first episode's search_state.pt
    pytest.param("finetune", None, marks=pytest.mark.slow),  # every write: 25 s
    pytest.param("search", None, marks=pytest.mark.slow),  # every write: 30 s
])
def test_killed_at_any_write_then_resumed_ends_as_the_uninterrupted_run(reference, tmp_path,
                                                                        script, points):
    """For each file the uninterrupted run writes (or the `points`-th ones), a run killed right
    after that write and then resumed (with nothing but --resume FOLDER) ends with the same
    best.pt, last.pt (or policy) and log, bit for bit; finetune's --distill and the search's
    budget come from the record."""
    runs, writes = reference
    teacher = runs["pretrain"] / "best.pt"
    data_root = load_checkpoint(str(teacher))[0]["args"]["data_root"]
    args = {"pretrain": lambda out: pretrain_args(data_root, out),
            "finetune": lambda out: finetune_args(teacher, out),
            "search": lambda out: search_args(teacher, out)}[script]
    log = "episodes.jsonl" if script == "search" else "log.jsonl"
    kills = points or range(1, len(writes[script]) + 1)
    # writes_into saw the uninterrupted run's writes: none seen, no kill would run either
    assert writes[script] and max(kills) <= len(writes[script]), writes[script]
    for k in kills:
        name = writes[script][k - 1]
        out = tmp_path / f"killed_after_{k}_{name}"
        with writes_into(out, crash_at=k), pytest.raises(Crash):
            run(script, *args(out))
        run(script, "--resume", out)
        if script == "search":
            for result in ("policy.json", "baselines.json"):
                assert (out / result).read_text() == (runs[script] / result).read_text(), result
        else:
            same_files(runs[script], out, ("best.pt", "last.pt"))
        assert log_lines(out / log) == log_lines(runs[script] / log), name


def test_a_quantize_only_fine_tune_killed_at_any_write_is_started_again(reference, tmp_path):
    """A fine-tune with --epochs 0 (run/finetune.sh's searched/ stage) killed after either of
    its checkpoint writes: the run scripts start it again. Killed after best.pt, before last.pt,
    its folder held a result without the record of whether its run ended, which they refused."""
    from lib.stage_status import stage_status
    runs, _ = reference
    for k in (1, 2):
        out = tmp_path / f"killed_after_{k}"
        args = [str(a) for a in ("--ckpt", runs["pretrain"] / "best.pt", "--bits", 3,
                                 "--epochs", 0, "--batch-size", 4, "--out", out)]
        with writes_into(out, crash_at=k), pytest.raises(Crash):
            run("finetune", *args)
        assert stage_status(str(out), "finetune", args) == "restart"
        run("finetune", *args, "--overwrite")
        assert stage_status(str(out), "finetune", args) == "finished"


def test_a_real_kill_between_last_and_best_is_repaired_on_resume(reference, tmp_path):
    """os._exit right after last.pt of epoch 1 (best.pt not written yet): the lock dies with the
    process, and the resumed run writes best.pt before it goes on."""
    runs, _ = reference
    data_root = load_checkpoint(str(runs["pretrain"] / "last.pt"))[0]["args"]["data_root"]
    out = tmp_path / "killed"
    driver = ("import os, runpy, sys\n"
              "real = os.replace\n"
              "def replace(src, dst):\n"
              "    real(src, dst)\n"
              "    if dst.endswith('last.pt'):\n"
              "        os._exit(9)\n"
              "os.replace = replace\n"
              "sys.argv = ['pretrain.py'] + sys.argv[1:]\n"
              "runpy.run_path('pretrain.py', run_name='__main__')\n")
    killed = subprocess.run([sys.executable, "-c", driver,
                             *map(str, pretrain_args(data_root, out))], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert (out / "last.pt").is_file() and not (out / "best.pt").exists()
    run("pretrain", "--resume", out / "last.pt")
    same_files(runs["pretrain"], out, ("best.pt", "last.pt"))


def test_a_run_with_loader_workers_resumes_as_the_uninterrupted_run(tmp_path):
    """--workers 1 (run/*.sh give 4) on a classifier, whose Dropout draws from the global
    generator: killed after epoch 1's last.pt and resumed, it ends bit for bit as the
    uninterrupted run. The persistent validation loader drew its workers' seed from the global
    generator once per process, so the resumed run drew once more and its masks differed."""
    from lib.data.synthetic import write_cls
    write_cls(str(tmp_path / "cls"), seed=0, train_shapes=3, eval_shapes=1)
    args = ("--model", "pt_cls_tiny", "--dataset", "synthetic_cls", "--data-root",
            tmp_path / "cls" / "modelnet40_normal_resampled", "--num-points", 64,
            "--batch-size", 4, "--epochs", 3, "--lr", 0.01, "--workers", 1)
    run("pretrain", *args, "--out", tmp_path / "straight")
    with writes_into(tmp_path / "resumed", crash_at=1), pytest.raises(Crash):
        run("pretrain", *args, "--out", tmp_path / "resumed")
    run("pretrain", "--resume", tmp_path / "resumed")
    same_files(tmp_path / "straight", tmp_path / "resumed", ("best.pt", "last.pt"))


def test_a_full_disk_at_a_checkpoint_write_is_one_line_and_loses_nothing(reference, tmp_path):
    """A resumed run whose disk fills up while it writes last.pt (here a file size limit, under
    which torch.save fails as on a full disk: a RuntimeError of its zip writer that names no
    file, a stack trace): one line naming last.pt, the finished epochs' files as they were and
    no temporary left; once there is room it resumes."""
    runs, _ = reference
    out = tmp_path / "full"
    shutil.copytree(runs["pretrain"], out)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    driver = ("import resource, runpy, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # the write fails, not the process
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
              "sys.argv = ['pretrain.py'] + sys.argv[1:]\n"
              "runpy.run_path('pretrain.py', run_name='__main__')\n")
    full = subprocess.run([sys.executable, "-c", driver, "--resume", str(out), "--epochs", "3"],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 1, full.stderr[-2000:]
    said = full.stderr.strip().splitlines()[-1]
    assert said.startswith(f"error: {out / 'last.pt'}: not written (") and "disk" in said, said
    assert before == {name: (out / name).read_bytes() for name in before}
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]
    run("pretrain", "--resume", out, "--epochs", 3)
    assert load_checkpoint(str(out / "last.pt"))[0]["epoch"] == 3


def test_a_folder_the_run_may_not_write_in_is_one_line(reference, tmp_path):
    """A read-only run folder (simulated: the tests may run as root, whom permissions do not
    stop) was a PermissionError stack trace."""
    runs, _ = reference
    out = tmp_path / "read_only"
    shutil.copytree(runs["pretrain"], out)
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    with mock.patch("lib.rundir.open", denied, create=True):
        message = refused("pretrain", "--resume", out, "--epochs", 3)
    assert message == f"error: {out / '.lock'}: Permission denied"


@pytest.mark.parametrize("flags", [("--seed", 1), ("--val-split", "train-slice")])
def test_eval_of_the_val_split_reproduces_best_pt(data, tmp_path, flags):
    """The seed fixes each val shape's point subset and --val-split chooses what validates; the
    checkpoint records both, so the figure best.pt holds is what evaluating its val split
    gives (it was not, for --seed 1 or a train slice)."""
    from lib.experiment import evaluate_checkpoint
    out = tmp_path / "run"
    run("pretrain", *pretrain_args(data, out, *flags))
    meta, _, _ = load_checkpoint(str(out / "best.pt"))
    _, results = evaluate_checkpoint(str(out / "best.pt"), split="val", batch_size=4)
    for key in ("accuracy", "ins_miou", "cat_miou"):
        assert results[key] == meta["metrics"][key], key


@pytest.mark.parametrize("recorded, given, used", [(True, None, True), (None, None, None),
                                                   (False, None, False), (True, False, False)])
def test_eval_scores_in_the_precision_the_run_recorded(reference, tmp_path, monkeypatch,
                                                      recorded, given, used):
    """A run trained with --amp validated and scored its test split in bf16; eval.py's default
    (bf16 on CUDA only) gave other figures than best.pt and best_test.json hold, on the CPU,
    and on CUDA the other way round for a --no-amp run."""
    import lib.train
    from lib.experiment import evaluate_checkpoint
    runs, _ = reference
    meta, model, _ = load_checkpoint(str(runs["pretrain"] / "best.pt"))
    meta["args"]["amp"] = recorded
    path = tmp_path / "best.pt"
    save_checkpoint(str(path), model, meta)
    seen = []
    monkeypatch.setattr(lib.train, "evaluate", lambda *args, **kw: seen.append(args[3]) or {})
    evaluate_checkpoint(str(path), split="val", batch_size=4, amp=given)
    assert seen == [used]


def test_each_run_records_the_precision_it_decided_on(reference):
    """--amp left out is bf16 on CUDA only: decided on the device the run starts on and recorded
    so. Recorded as None, a run started on a GPU and resumed on the CPU (--device may change at
    resume) went on in fp32, and a search's rewards mixed the two precisions."""
    from lib.checkpoint import torch_load
    from lib.cli import resolve_amp
    runs, _ = reference
    for name in ("pretrain", "finetune"):
        assert load_checkpoint(str(runs[name] / "last.pt"))[0]["args"]["amp"] is False
    assert torch_load(str(runs["search"] / "search_state.pt"))["args"]["amp"] is False
    assert resolve_amp(None, torch.device("cuda")) is True
    assert resolve_amp(False, torch.device("cuda")) is False
    assert resolve_amp(True, torch.device("cpu")) is True


def test_a_relative_data_root_is_recorded_absolute(reference, data):
    runs, _ = reference
    meta = load_checkpoint(str(runs["pretrain"] / "best.pt"))[0]
    assert meta["args"]["data_root"] == meta["dataset"]["root"] == str(data)


# --- numbers that are not numbers ----------------------------------------------------------------

def test_a_diverging_run_stops_with_epoch_and_step_and_saves_nothing(data, tmp_path):
    out = tmp_path / "diverged"
    message = refused("pretrain", *pretrain_args(data, out, "--optimizer", "sgd"), "--lr", 1e30)
    assert "epoch 1, step" in message and "not finite" in message
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def test_a_search_whose_reward_fine_tune_diverges_stops_and_writes_no_policy(reference,
                                                                              tmp_path):
    """A NaN candidate would still score (one class everywhere) and could become the best."""
    runs, _ = reference
    out = tmp_path / "search"
    message = refused("search", *search_args(runs["pretrain"] / "best.pt", out),
                      "--finetune-lr", 1e30)
    assert "left" in message and "NaN or infinite; search stopped: start it again with a lower " \
        "--finetune-lr and --overwrite" in message
    assert not (out / "policy.json").exists() and not (out / "search_state.pt").exists()


def test_eval_refuses_a_checkpoint_with_non_finite_weights(reference, tmp_path):
    runs, _ = reference
    meta, model, _ = load_checkpoint(str(runs["pretrain"] / "best.pt"))
    next(model.parameters()).data[0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(str(path), model, meta)
    assert "NaN or infinite" in refused("eval", "--ckpt", path)


@pytest.mark.parametrize("flag, target, message", [
    ("--save-pred", "afile", "afile is a file, not a folder"),
    ("--render-dir", "afile/figures", "afile is a file, not a folder"),
    ("--json", "missing/out.json", "no folder .*missing to write it in"),
    ("--json", ".", "a folder, not a file"),
])
def test_eval_outputs_that_cannot_be_written_are_refused_before_scoring(reference, tmp_path,
                                                                        monkeypatch, flag, target,
                                                                        message):
    """They failed with a stack trace, or after the whole split was scored."""
    import eval as eval_script
    runs, _ = reference
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep")
    monkeypatch.setattr(eval_script, "evaluate_checkpoint", None)  # never reached
    argv = ["--ckpt", runs["pretrain"] / "best.pt", flag, target]
    if flag == "--render-dir":
        argv += ["--render", 1]
    assert re.search(message, refused("eval", *argv))
    assert (tmp_path / "afile").read_text() == "keep"
    if flag != "--json":  # from Python, where nothing made the path absolute (it looped)
        args = eval_script.get_args_parser().parse_args([str(a) for a in argv[:2]]
                                                        + ["--render", "1"])
        setattr(args, flag[2:].replace("-", "_"), target)
        with pytest.raises(ValueError, match=message):
            eval_script.check_outputs(args)


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta["model"].update(name="nope"), "does not describe a model .*unknown model"),
    (lambda meta: meta.pop("dataset"), "records no dataset to score it on"),
])
def test_eval_of_a_checkpoint_with_broken_metadata_names_the_file(reference, tmp_path, change,
                                                                   message):
    runs, _ = reference
    meta, model, _ = load_checkpoint(str(runs["pretrain"] / "best.pt"))
    change(meta)
    path = tmp_path / "broken.pt"
    save_checkpoint(str(path), model, meta)
    assert re.search(f"{path}: .*{message}", refused("eval", "--ckpt", path))


def test_kd_temperature_zero_is_refused(reference, capsys):
    runs, _ = reference
    with pytest.raises(SystemExit):
        run("finetune", *finetune_args(runs["pretrain"] / "best.pt", "x"), "--kd-temperature", 0)
    assert "--kd-temperature: 0 is out of range" in capsys.readouterr().err


# --- settings that would run and save garbage ------------------------------------------------

def test_a_batch_larger_than_the_training_set_is_refused(data, tmp_path):
    out = tmp_path / "big_batch"
    message = refused("pretrain", *pretrain_args(data, out), "--batch-size", 64)
    assert "--batch-size 64 is larger than the 12 training samples" in message
    assert not (out / "best.pt").exists()


@pytest.mark.parametrize("script, flags, expected", [
    ("pretrain", ("--epochs", "0"), "error: --epochs 0: pretraining needs at least one epoch"),
    ("pretrain", ("--epochs", "-1"), "argument --epochs: -1 is out of range"),
    ("search", ("--ckpt", "x.pt", "--episodes", "0"), "argument --episodes: 0 is out of range"),
    ("search", ("--ckpt", "x.pt", "--min-bit", "6", "--max-bit", "4"), "--min-bit 6 is above"),
    ("finetune", ("--ckpt", "x.pt", "--bits", "33"), "argument --bits: 33 is out of range"),
])
def test_degenerate_settings_are_refused_before_any_work(tmp_path, capsys, script, flags,
                                                         expected):
    with mock.patch("lib.experiment.load_split", side_effect=AssertionError("loaded data")):
        with pytest.raises(SystemExit) as stop:
            run(script, *flags, "--out", tmp_path / "run")
    assert expected in str(stop.value.code) + capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- files -------------------------------------------------------------------------------------

def test_a_flipped_byte_in_a_packed_checkpoint_is_refused(reference, tmp_path):
    runs, _ = reference
    data = bytearray((runs["finetune"] / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(str(path))


def test_checkpoints_get_the_usual_file_permissions(reference):
    runs, _ = reference
    mask = os.umask(0)
    os.umask(mask)
    for path in (runs["pretrain"] / "best.pt", runs["finetune"] / "best.pt",
                 runs["search"] / "search_state.pt", runs["search"] / "policy.json"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path


def test_a_binary_point_file_is_an_error_naming_it(tmp_path):
    from lib.data import read_point_table
    path = tmp_path / "shape.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="shape.txt: line 1: not UTF-8 text"):
        read_point_table(str(path), 7)


def test_messages_are_whole_and_plain():
    long = "x" * 300
    assert one_line(f"\x1b[31mfailed\x1b[0m: {long}\n  second line") == f"failed: {long} second line"

    def main(args):
        raise ValueError(f"\x1b[1m{long}\x1b[0m")
    with pytest.raises(SystemExit) as stop:
        run_script(main, importlib.import_module("eval").get_args_parser(), argv=["--ckpt", "x"])
    assert stop.value.code == f"error: {long}"


def test_the_results_table_marks_rows_that_are_not_this_runs_finished_work(reference, tmp_path):
    """A pretraining replaced or extended after the search, or a stage killed before its end,
    gave rows that looked like one finished run's; now each such row says why it is not."""
    from lib.checkpoint import file_sha256, torch_save_atomic
    from lib.results_table import stage_problems
    runs, _ = reference
    pretrain, finetune = tmp_path / "pretrain", tmp_path / "finetune"
    shutil.copytree(runs["pretrain"], pretrain)
    shutil.copytree(runs["finetune"], finetune)
    fp32_sha = file_sha256(pretrain / "best.pt")
    assert stage_problems(finetune, finetune / "best.pt", fp32_sha) == []
    assert stage_problems(pretrain, pretrain / "best.pt", fp32_sha) == []
    assert stage_problems(finetune, finetune / "best.pt", "0" * 64) == [
        "quantized from another fp32 model than pretrain/best.pt"]
    (finetune / "best_test.json").unlink()  # killed during its final test scoring
    assert stage_problems(finetune, finetune / "best.pt", fp32_sha) == [
        "unfinished: its test scoring did not end"]
    last = torch.load(pretrain / "last.pt", weights_only=True)  # a run extended to 3 epochs,
    last["meta"]["args"]["epochs"] = 3  # killed after its second
    torch_save_atomic(last, str(pretrain / "last.pt"))
    assert stage_problems(pretrain, pretrain / "best.pt", fp32_sha) == ["unfinished: epoch 2 of 3"]


def test_a_stage_folder_says_what_a_run_script_started_again_does(reference, tmp_path):
    from lib.checkpoint import torch_save_atomic
    from lib.stage_status import stage_status

    def status(script, folder, *flags):
        return stage_status(str(folder), script, ["--out", str(folder), *map(str, flags)])
    runs, _ = reference
    assert status("pretrain", tmp_path / "none") == "new"
    for name in ("pretrain", "finetune", "search"):
        assert status(name, runs[name]) == "finished", name
    # a finished stage asked for more is extended; asked for another setting, refused
    assert status("pretrain", runs["pretrain"], "--epochs", 3).startswith("resume ")
    assert "--lr 0.5 (recorded 0.01)" in status("pretrain", runs["pretrain"], "--lr", 0.5)
    assert status("pretrain", runs["pretrain"], "--lr", 0.5).startswith("refuse ")
    assert status("pretrain", runs["pretrain"], "--overwrite") == "new"  # as the user asks
    finetune, search, pretrain = tmp_path / "finetune", tmp_path / "search", tmp_path / "pretrain"
    for name, folder in (("finetune", finetune), ("search", search), ("pretrain", pretrain)):
        shutil.copytree(runs[name], folder)
    (finetune / "best_test.json").unlink()  # killed during its final test scoring
    assert status("finetune", finetune) == f"resume {finetune / 'last.pt'}"
    (search / "baselines.json").unlink()  # killed after its last episode
    assert status("search", search) == f"resume {search / 'search_state.pt'}"
    last = torch.load(pretrain / "last.pt", weights_only=True)
    last["meta"]["args"]["epochs"] = 3  # killed after epoch 2 of 3
    torch_save_atomic(last, str(pretrain / "last.pt"))
    assert status("pretrain", pretrain) == f"resume {pretrain / 'last.pt'}"
    (pretrain / "last.pt").unlink()  # a best.pt alone: its run may not have ended, and
    assert status("pretrain", pretrain).startswith(f"refuse {pretrain} holds")  # is kept
    (search / "search_state.pt").unlink()  # the same for a policy.json alone
    assert status("search", search).startswith(f"refuse {search} holds")
    # a fine-tune with --epochs 0 writes its last.pt packed, as best.pt, with no state to resume
    shutil.copyfile(finetune / "best.pt", finetune / "last.pt")
    assert status("finetune", finetune) == "restart"
    (finetune / "best_test.json").write_text("{}")
    assert status("finetune", finetune) == "finished"
    for name in ("best.pt", "last.pt", "best_test.json"):  # killed before its first checkpoint
        (finetune / name).unlink()
    assert status("finetune", finetune) == "restart"


def test_a_stage_whose_input_changed_since_is_refused_not_skipped(reference, tmp_path):
    """A search run again (--overwrite) after the fine-tunes, or a pretraining extended after
    the search: started again, the scripts skipped the later stages as "finished" (they had
    been run on the old policy / model), and the table showed the fine-tunes' rows as the new
    policy's. Now the stage is refused with the file that changed, and the row says so."""
    from lib.checkpoint import file_sha256
    from lib.results_table import stage_problems
    from lib.stage_status import stage_status
    runs, _ = reference
    root = tmp_path / "run"
    for name in ("pretrain", "search"):
        shutil.copytree(runs[name], root / name)
    teacher, policy = root / "pretrain" / "best.pt", root / "search" / "policy.json"
    searched = root / "searched"
    run("finetune", "--ckpt", teacher, "--policy", policy, "--keep-first-last", "",
        "--epochs", 0, "--batch-size", 4, "--out", searched)

    def status(script, folder, *flags):
        return stage_status(str(folder), script, ["--out", str(folder), *map(str, flags)])
    finetune_flags = ("--ckpt", teacher, "--policy", policy, "--keep-first-last", "",
                      "--epochs", 0, "--batch-size", 4)
    assert status("finetune", searched, *finetune_flags) == "finished"
    assert status("search", root / "search", "--ckpt", teacher) == "finished"
    fp32_sha = file_sha256(teacher)
    assert stage_problems(searched, searched / "best.pt", fp32_sha) == []

    record = json.loads(policy.read_text())
    record["checkpoint"] = "/elsewhere/pretrain/best.pt"  # a search extended in a moved run
    policy.write_text(json.dumps(record))  # rewrites that path alone: the same policy
    assert status("finetune", searched, *finetune_flags) == "finished"
    record["episode"] += 1  # searched again: another policy.json
    policy.write_text(json.dumps(record))
    said = status("finetune", searched, *finetune_flags)
    assert said.startswith(f"refuse {searched}: inputs its run read have changed since: "
                           f"--policy {policy} (another policy); give --overwrite"), said
    assert stage_problems(searched, searched / "best.pt", fp32_sha) == [
        "quantized with another policy than search/policy.json holds now"]
    assert status("finetune", searched, *finetune_flags, "--overwrite") == "new"
    policy.unlink()
    assert f"--policy {policy} (missing)" in status("finetune", searched, *finetune_flags)

    with open(teacher, "ab") as f:  # the pretraining replaced after the search
        f.write(b"\0")
    said = status("search", root / "search", "--ckpt", teacher)
    assert said.startswith("refuse ") and f"--ckpt {teacher}" in said, said


def test_a_copied_or_moved_run_folder_carries_on_in_the_copy(reference, data, tmp_path):
    """A run folder copied with its inputs (RUN/pretrain/best.pt read by RUN/search), or data
    reached through a symlink, was refused on its recorded absolute paths ("--ckpt ...
    (recorded ...)"), finished stages included; the README says an archived copy resumes in the
    copy. A path at the same place in the copied run, or the same file by another name, is the
    same input (its contents are checked apart); another folder is still refused."""
    from lib.stage_status import stage_status
    runs, _ = reference
    copy = tmp_path / "copy"
    for name in ("pretrain", "search"):
        shutil.copytree(runs[name], copy / name)

    def status(script, folder, *flags):
        return stage_status(str(folder), script, ["--out", str(folder), *map(str, flags)])
    teacher = copy / "pretrain" / "best.pt"
    assert status("search", copy / "search", "--ckpt", teacher) == "finished"
    linked = tmp_path / "linked-data"
    linked.symlink_to(data, target_is_directory=True)
    assert status("pretrain", copy / "pretrain", "--data-root", linked) == "finished"
    other = tmp_path / "other-data"
    shutil.copytree(data, other)  # the same files elsewhere: not provably the same data
    assert status("pretrain", copy / "pretrain", "--data-root", other).startswith("refuse ")
    gone = tmp_path / "gone"  # data moved away from the recorded place: say how to go on
    (copy / "pretrain" / "last.pt").rename(copy / "pretrain" / "kept.pt")
    last = torch.load(copy / "pretrain" / "kept.pt", weights_only=True)
    last["meta"]["args"]["data_root"] = str(gone)
    torch.save(last, copy / "pretrain" / "last.pt")
    said = status("pretrain", copy / "pretrain", "--data-root", data)
    assert f"--data-root {data} (recorded {gone}; gone: a link there to the new place" in said
    gone.symlink_to(data, target_is_directory=True)
    assert status("pretrain", copy / "pretrain", "--data-root", data) == "finished"
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copyfile(teacher, elsewhere)  # not where the run's own input was
    said = status("search", copy / "search", "--ckpt", elsewhere)
    assert said.startswith("refuse ") and f"--ckpt {elsewhere} (recorded" in said, said
    # resumed without naming its --ckpt while the original run is still there, the copy reads
    # its own (it went back to the original's, and stopped once that was moved away)
    parser = importlib.import_module("search").get_args_parser()
    argv = ["--resume", str(copy / "search")]
    settings = resumed_args(parser, argv, parser.parse_args(argv), "search")
    assert settings.ckpt == str(teacher) and runs["pretrain"].exists()
    # data has no recorded contents: a data folder at the same place beside a copied run is
    # not taken for the recorded one
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(copy / "pretrain", a / "exp")
    shutil.copytree(data, a / "data")
    last = torch.load(a / "exp" / "last.pt", weights_only=True)
    last["meta"]["args"].update(data_root=str(a / "data"), out=str(a / "exp"))
    torch.save(last, a / "exp" / "last.pt")
    shutil.copytree(a, b)
    said = status("pretrain", b / "exp", "--data-root", b / "data")
    assert said.startswith("refuse ") and f"--data-root {b / 'data'} (recorded" in said, said


def test_a_last_pt_of_another_run_beside_this_runs_best_pt_is_refused(reference, data, tmp_path,
                                                                      capsys):
    """The same command run again in another folder ends with the same best epoch; its last.pt
    copied into the first run's folder was resumed there beside the first run's best.pt (and
    the stage taken as ended), best.pt then not the best of the run that went on. Each run
    records a random run_id; checkpoints written before it (none) still resume."""
    from lib.stage_status import main, stage_status
    runs, _ = reference
    mixed, again = tmp_path / "mixed", tmp_path / "again"
    shutil.copytree(runs["pretrain"], mixed)
    run("pretrain", *pretrain_args(data, again))
    assert (torch.load(again / "last.pt", weights_only=True)["resume"]["best_epoch"]
            == load_checkpoint(str(mixed / "best.pt"))[0]["epoch"])
    shutil.copyfile(again / "last.pt", mixed / "last.pt")
    message = refused("pretrain", "--resume", mixed, "--epochs", 3)
    assert f"{mixed / 'best.pt'}: written by another run (run_id " in message
    capsys.readouterr()
    main([str(mixed), "pretrain", "--out", str(mixed)])  # as run/*.sh ask it
    said = capsys.readouterr().out
    assert said.startswith(f"refuse {mixed}: {mixed / 'best.pt'}: written by another run"), said
    for name in ("last.pt", "best.pt"):  # as written before runs had an id
        record = torch.load(mixed / name, weights_only=True)
        del record["meta"]["args"]["run_id"]
        torch.save(record, mixed / name)
    assert stage_status(str(mixed), "pretrain", ["--out", str(mixed)]) == "finished"
    run("pretrain", "--resume", mixed, "--epochs", 3)
    assert load_checkpoint(str(mixed / "last.pt"))[0]["args"]["run_id"]  # one from now on


def test_a_search_state_of_another_search_beside_this_ones_args_is_refused(reference, tmp_path,
                                                                           capsys):
    """The search_state.pt of another search (--preserve-ratio 0.2, --seed 1) copied into a
    search's folder was resumed there with its own settings, without a word: the folder's
    episodes.jsonl, tensorboard events and policy.json then mixed two searches. Each search
    records a random run_id; a state written before it still resumes."""
    from lib.stage_status import main, stage_status
    runs, _ = reference
    mixed, other = tmp_path / "mixed", tmp_path / "other"
    shutil.copytree(runs["search"], mixed)
    run("search", *search_args(runs["pretrain"] / "best.pt", other), "--preserve-ratio", 0.2,
        "--seed", 1)
    shutil.copyfile(other / "search_state.pt", mixed / "search_state.pt")
    message = refused("search", "--resume", mixed, "--episodes", 3)
    assert f"{mixed / 'search_state.pt'}: written by another search (run_id " in message
    for setting in ("--preserve-ratio 0.2 (args.json: 0.1)", "--seed 1 (args.json: 0)"):
        assert setting in message, message
    as_search_sh = [str(flag) for flag in search_args(runs["pretrain"] / "best.pt", mixed)]
    capsys.readouterr()
    main([str(mixed), "search", *as_search_sh])
    said = capsys.readouterr().out
    assert said.startswith(f"refuse {mixed}: {mixed / 'search_state.pt'}: written by another "
                           f"search"), said
    # the folder's own state, as written before searches had an id
    state = torch.load(runs["search"] / "search_state.pt", weights_only=True)
    del state["args"]["run_id"]
    torch.save(state, mixed / "search_state.pt")
    assert stage_status(str(mixed), "search", as_search_sh) == "finished"
    run("search", "--resume", mixed, "--episodes", 3)
    assert torch.load(mixed / "search_state.pt", weights_only=True)["args"]["run_id"]  # from now on


def test_a_run_moved_with_its_inputs_resumes_without_naming_them(reference, tmp_path):
    """`finetune.py --resume COPY/finetune/last.pt` after the original run folder was moved:
    the recorded --ckpt no longer existed and the resume stopped on it; the copy's own
    pretrain/best.pt (same place in the run, same SHA-256) is taken instead."""
    runs, _ = reference
    original, moved = tmp_path / "original", tmp_path / "moved"
    shutil.copytree(runs["pretrain"], original / "pretrain")
    run("finetune", *finetune_args(original / "pretrain" / "best.pt", original / "finetune"))
    from lib import rundir  # that run's process ends: its lock goes (held till then in-process)
    rundir._held.pop(os.path.realpath(original / "finetune")).close()
    shutil.move(original, moved)
    run("finetune", "--resume", moved / "finetune" / "last.pt", "--epochs", 3)
    meta, _, resume = load_checkpoint(str(moved / "finetune" / "last.pt"))
    assert resume["epoch"] == 3 and meta["args"]["ckpt"] == str(moved / "pretrain" / "best.pt")


def test_a_damaged_stage_folder_is_one_line(tmp_path):
    from lib.stage_status import main
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "lib.stage_status", str(tmp_path), "pretrain",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith(f"refuse {tmp_path}: ") and out.stdout.count("\n") == 1
    assert callable(main)


def test_damaged_records_in_a_run_folder_are_one_line_for_the_table(reference, tmp_path):
    """A best.pt holding a bare tensor, a last.pt whose resume record is not a dict, an unknown
    script: tracebacks (AttributeError, TypeError, ModuleNotFoundError) before."""
    runs, _ = reference
    bare, odd = tmp_path / "bare", tmp_path / "odd"
    (bare / "pretrain").mkdir(parents=True)
    torch.save(torch.zeros(3), bare / "pretrain" / "best.pt")
    shutil.copytree(runs["pretrain"], odd / "pretrain")
    last = torch.load(odd / "pretrain" / "last.pt", weights_only=True)
    last["resume"] = 3
    torch.save(last, odd / "pretrain" / "last.pt")
    for run_folder, said in ((bare, "best.pt: not a checkpoint of this repository"),
                             (odd, "last.pt: not a last.pt of pretrain.py or finetune.py")):
        out = subprocess.run([sys.executable, "-m", "lib.results_table", "--run", str(run_folder)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and out.stderr.strip().startswith("error: "), out.stderr
        assert said in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "lib.stage_status", str(runs["pretrain"]),
                          "nosuch"], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("refuse ") and out.stderr == "", out.stderr


def test_run_scripts_started_again_skip_continue_and_restart(reference, tmp_path):
    """run/finetune.sh killed in its second stage stopped at its first when started again
    ("already holds a run"); now each stage goes on as its folder asks (run/recipes.sh's
    `stage`, given each stage's own command)."""
    runs, _ = reference
    teacher = runs["pretrain"] / "best.pt"
    for stage in ("ended", "cut", "early"):
        shutil.copytree(runs["finetune"], tmp_path / stage)
    (tmp_path / "cut" / "best_test.json").unlink()  # killed in its final test scoring
    for name in ("best.pt", "last.pt", "best_test.json"):  # killed before its first checkpoint
        (tmp_path / "early" / name).unlink()

    def started_again(*stages):
        script = "; ".join(
            f"stage {shlex.quote(str(tmp_path / stage))} finetune.py "
            + " ".join(shlex.quote(str(a)) for a in args) for stage, args in stages)
        return subprocess.run(["bash", "-c", f". run/setup_env.sh && . run/recipes.sh && "
                               f"{script}"], cwd=REPO, capture_output=True, text=True,
                              timeout=180, env=dict(os.environ, DRY_RUN="1"))
    out = started_again(*[(stage, finetune_args(teacher, tmp_path / stage))
                          for stage in ("ended", "cut", "early")])
    assert out.returncode == 0, out.stderr
    cut, early = [shlex.split(line) for line in out.stdout.splitlines()
                  if not line.startswith("[setup]")]
    assert f"{tmp_path / 'ended'}: finished; skipped" in out.stderr
    assert cut[-2:] == ["--resume", str(tmp_path / "cut" / "last.pt")]
    assert early[-1] == "--overwrite" and "--resume" not in early
    # a finished stage asked for another setting stops the script, in one line
    out = started_again(("ended", (*finetune_args(teacher, tmp_path / "ended"), "--lr", 0.5)))
    assert out.returncode == 2 and "--lr 0.5 (recorded 0.001)" in out.stderr


def test_a_stage_waits_for_its_input_stage_to_end(reference, tmp_path):
    """search.sh searched on the best.pt of a pretraining killed between its last.pt and its
    best.pt (a stale epoch), without a word."""
    from lib.checkpoint import torch_save_atomic
    runs, _ = reference
    shutil.copytree(runs["pretrain"], tmp_path / "pretrain")
    last = torch.load(tmp_path / "pretrain" / "last.pt", weights_only=True)
    last["meta"]["args"]["epochs"] = 3  # killed in epoch 3
    torch_save_atomic(last, str(tmp_path / "pretrain" / "last.pt"))
    for script in ("search.sh", "finetune.sh"):
        out = subprocess.run(["bash", f"run/{script}"], cwd=REPO, capture_output=True,
                             text=True, timeout=120,
                             env=dict(os.environ, DRY_RUN="1", RUN=str(tmp_path)))
        assert out.returncode == 2  # and nothing launched:
        assert not [line for line in out.stdout.splitlines() if not line.startswith("[setup]")]
        assert f"{tmp_path / 'pretrain'}: its run has not ended (interrupted)" in out.stderr
    # a best.pt put there by hand (no last.pt: no record of a run) is taken as it is
    (tmp_path / "pretrain" / "last.pt").unlink()
    out = subprocess.run(["bash", "run/search.sh"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, DRY_RUN="1", RUN=str(tmp_path)))
    assert out.returncode == 0 and "search.py" in out.stdout, out.stderr


def tensorboard_points(folder, tag):
    """(step, value) of a scalar as tensorboard shows it (purged points hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# what a resume goes on from, and two tags its tensorboard charts draw from episode or epoch 1
KILLED_RUNS = {"search": ("search_state.pt", ("search/reward", "search_best/metric")),
               "pretrain": ("last.pt", ("train/loss", "val/ins_miou"))}


@pytest.mark.parametrize("script", sorted(KILLED_RUNS))
@pytest.mark.parametrize("kill, on_disk", [("after", 1), ("before", 2)])
def test_a_killed_run_shows_each_episode_or_epoch_once_in_tensorboard(data, reference, tmp_path,
                                                                      script, kill, on_disk):
    """search.py wrote an episode's state before its tensorboard points, and fit (pretrain.py,
    finetune.py) an epoch's last.pt before its points (queued for tensorboard's thread, which
    writes them out every 2 minutes): killed right after the first state or last.pt, the resume
    went on from the next episode or epoch and the first was missing from every chart. The
    points now come first, written out, and the resume hides those of an episode or epoch it
    runs again (killed right before the second state or last.pt lands), so each shows once, as
    in the uninterrupted run. Killed for real (os._exit), as a process that lives on would
    still write its queued points."""
    runs, _ = reference
    state, tags = KILLED_RUNS[script]
    out = tmp_path / "killed"
    flags = (search_args(runs["pretrain"] / "best.pt", out) if script == "search"
             else pretrain_args(data, out))
    driver = ("import os, runpy, sys\n"
              "real, states = os.replace, []\n"
              "def replace(src, dst):\n"
              f"    states.append(os.path.basename(dst) == {state!r})\n"
              f"    if {kill == 'before'} and sum(states) == 2 and states[-1]:\n"
              "        os._exit(9)\n"
              "    real(src, dst)\n"
              f"    if {kill == 'after'} and states[-1]:\n"
              "        os._exit(9)\n"
              "os.replace = replace\n"
              f"sys.argv = ['{script}.py'] + sys.argv[1:]\n"
              f"runpy.run_path('{script}.py', run_name='__main__')\n")
    killed = subprocess.run([sys.executable, "-c", driver, *map(str, flags)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    complete = {tag: tensorboard_points(runs[script], tag) for tag in tags}
    assert all(len(points) == 2 for points in complete.values())  # episodes 0, 1 or epochs 1, 2
    for tag, points in complete.items():
        assert tensorboard_points(out, tag) == points[:on_disk], tag
    run(script, "--resume", out)
    for tag, points in complete.items():
        assert tensorboard_points(out, tag) == points, tag


@pytest.mark.parametrize("script", ["search", "finetune"])
def test_a_checkpoint_whose_data_folder_is_gone_is_one_line_for_search_and_finetune(
        reference, tmp_path, script):
    """As eval.py: search.py and finetune.py read the data folder the fp32 checkpoint records;
    one brought from another machine made them generate the default synthetic set at that
    foreign path and search or fine-tune on it. They now ask for --data-root."""
    from lib.checkpoint import save_checkpoint
    runs, _ = reference
    meta, model, _ = load_checkpoint(str(runs["pretrain"] / "best.pt"))
    gone = tmp_path / "elsewhere" / "data" / "synthetic" / "parts"
    moved = tmp_path / "best.pt"
    save_checkpoint(str(moved), model, dict(meta, dataset=dict(meta["dataset"], root=str(gone))))
    args = (search_args if script == "search" else finetune_args)(moved, tmp_path / "out")
    message = refused(script, *args)
    assert "does not exist here" in message and "--data-root" in message, message
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("script", ["search", "finetune"])
def test_a_run_folder_given_as_ckpt_names_the_checkpoints_in_it(reference, tmp_path, script):
    """search.py / finetune.py --ckpt RUN (the pretraining folder for its best.pt) said 'no such
    file' of a folder that exists; as eval.py, they now say what it is and what to give."""
    runs, _ = reference
    args = (search_args if script == "search" else finetune_args)(runs["pretrain"],
                                                                  tmp_path / "out")
    message = refused(script, *args)
    assert message == (f"error: {runs['pretrain']}: a folder, not a checkpoint file; it holds "
                       f"best.pt and last.pt: give one of them (given as --ckpt)"), message
    if script == "finetune":
        message = refused(script, "--ckpt", runs["pretrain"] / "best.pt", "--policy",
                          runs["search"], "--out", tmp_path / "out")
        assert message == (f"error: {runs['search']}: a folder, not a policy file (given as "
                           f"--policy); give its policy.json"), message
