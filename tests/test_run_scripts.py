"""run/*.sh: every task's recipe (run/recipes.sh) through DRY_RUN=1, which prints the commands
instead of running them; and finetune.py's guard that a mixed policy keeps its budget."""
import json
import os
import re
import shlex
import subprocess

import pytest

from finetune import check_same_keep, sharing_method
from search import get_args_parser as search_parser
from lib.policy_file import PolicyFile, parse_keep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("partseg", "s3dis", "modelnet40_pt", "modelnet40_pct")


# run/recipes.sh's environment knobs: only what a test gives, never the test runner's shell's
KNOBS = ("TASK", "DATA", "RUN", "NPROC", "EPOCHS", "EPISODES")


def commands(script, *args, **env):
    """The commands run/SCRIPT would run, each as its argument list."""
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    out = subprocess.run(["bash", f"run/{script}", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=dict(base, DRY_RUN="1", **env))
    assert out.returncode == 0, out.stderr
    # run/setup_env.sh may report a (re)install of .venv first
    return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("[setup]")]


def flag(argv, name):
    """The value argparse would take: the last occurrence."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


@pytest.mark.parametrize("task", TASKS)
def test_search_and_finetune_keep_the_same_layers_fixed(task):
    """The search charges the fixed first/last layers to its budget only if it fixes them at
    the width the fine-tuning later applies; every recipe does, and fixes them (mix)."""
    (search,) = commands("search.sh", TASK=task)
    finetunes = commands("finetune.sh", TASK=task)
    assert len(finetunes) == 3
    keep = flag(search, "--keep-first-last")
    assert parse_keep(keep) not in ("off", None)
    assert all(flag(argv, "--keep-first-last") == keep for argv in finetunes)
    assert flag(search, "--warmup") == "20"
    # HAQ's short fine-tune of each candidate stays on: search.py's default length (None)
    assert flag(search, "--finetune-steps") is None
    assert search_parser().get_default("finetune_steps") is None
    run = os.path.join(REPO, "checkpoints", task)  # the default RUN
    assert flag(search, "--ckpt") == f"{run}/pretrain/best.pt"
    assert all(flag(argv, "--policy") == f"{run}/search/policy.json" for argv in finetunes)


def test_data_root_from_the_command_line_wins_and_data_sets_it():
    (argv,) = commands("pretrain.sh", "--data-root", "/elsewhere", DATA="/data/parts")
    assert flag(argv, "--data-root") == "/elsewhere"
    (argv,) = commands("pretrain.sh", DATA="/data/parts", RUN="/runs/a")
    assert flag(argv, "--data-root") == "/data/parts" and flag(argv, "--out") == "/runs/a/pretrain"


def test_total_batch_is_split_over_processes():
    (one,) = commands("pretrain.sh", TASK="s3dis")
    (four,) = commands("pretrain.sh", TASK="s3dis", NPROC="4")
    assert one[0] == "python" and four[:3] == ["torchrun", "--nproc-per-node", "4"]
    assert int(flag(one, "--batch-size")) == 4 * int(flag(four, "--batch-size")) == 16
    assert flag(one, "--lr") == flag(four, "--lr") == "0.5"
    # S3DIS: 100 epochs of 6400 crops at 16 = the paper's 40k iterations, 80k points each
    assert int(flag(one, "--epochs")) * int(flag(one, "--samples-per-epoch")) // 16 == 40000
    assert flag(one, "--num-points") == "80000"
    out = subprocess.run(["bash", "run/pretrain.sh"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, DRY_RUN="1", NPROC="3"), timeout=60)
    assert out.returncode != 0 and "does not divide" in out.stderr


def test_search_and_eval_batches_are_each_processes_at_any_nproc():
    """Not split like the training batch: each process scores the batches one process would,
    and runs the search's short fine-tune whole at that batch, so the searched policy and the
    scores do not depend on NPROC (run/recipes.sh, BATCH)."""
    (search,) = commands("search.sh", TASK="s3dis", NPROC="2")
    (scores,) = commands("eval.sh", TASK="s3dis", NPROC="2")
    assert flag(search, "--batch-size") == flag(scores, "--batch-size") == "4"


def test_extra_epochs_never_fine_tune_the_searched_row():
    """searched/ is the policy as searched: --epochs given for the fine-tunes does not reach it."""
    searched, finetune, distill = commands("finetune.sh", "--epochs", "5")
    assert flag(searched, "--epochs") == "0"
    assert flag(finetune, "--epochs") == flag(distill, "--epochs") == "5"


def test_epochs_and_episodes_knobs_reach_the_scripts_and_flags_win():
    """EPOCHS / EPISODES set a stage's length (a short trial) without extra flags; unset, the
    recipe's; flags given on the command line still win, and searched/ still trains none."""
    (pretrain,) = commands("pretrain.sh", EPOCHS="2")
    assert flag(pretrain, "--epochs") == "2"
    searched, finetune, distill = commands("finetune.sh", EPOCHS="3")
    assert flag(searched, "--epochs") == "0"
    assert flag(finetune, "--epochs") == flag(distill, "--epochs") == "3"
    (search,) = commands("search.sh", EPISODES="5")
    assert flag(search, "--episodes") == "5"
    assert flag(commands("pretrain.sh")[0], "--epochs") == "200"
    assert flag(commands("search.sh")[0], "--episodes") == "600"
    (pretrain,) = commands("pretrain.sh", "--epochs", "4", EPOCHS="2")
    assert flag(pretrain, "--epochs") == "4"
    (search,) = commands("search.sh", "--episodes", "7", EPISODES="5")
    assert flag(search, "--episodes") == "7"
    out = subprocess.run(["bash", "run/search.sh"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, DRY_RUN="1", EPISODES="ten"))
    assert out.returncode == 2 and not out.stdout
    assert out.stderr.strip().splitlines()[-1] == "EPISODES=ten: give a whole number"


def test_printed_commands_paste_back_with_spaces_in_paths():
    (search,) = commands("search.sh", RUN="/tmp/my run", DATA="/data/s 3")
    assert flag(search, "--ckpt") == "/tmp/my run/pretrain/best.pt"
    assert flag(search, "--data-root") == "/data/s 3"


@pytest.mark.parametrize("nproc", ["0", "two", "-1"])
def test_a_bad_nproc_is_one_line(nproc):
    out = subprocess.run(["bash", "run/pretrain.sh"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, DRY_RUN="1", NPROC=nproc))
    assert out.returncode == 2 and not out.stdout
    assert (out.stderr.strip().splitlines()[-1]
            == f"NPROC={nproc}: give a number of processes, 1 or more")


def test_eval_sh_scores_a_run_or_one_checkpoint():
    (run,) = commands("eval.sh", RUN="/runs/a")
    assert run[1:5] == ["-m", "lib.results_table", "--run", "/runs/a"]
    (one,) = commands("eval.sh", "x/best.pt", "--split", "val")
    assert one[1:4] == [os.path.join(REPO, "eval.py"), "--ckpt", "x/best.pt"]
    assert flag(one, "--split") == "val"


def test_under_torchrun_the_scripts_flags_reach_the_script():
    """torchrun took eval.sh's --run for an abbreviation of its --run-path and stopped."""
    (run,) = commands("eval.sh", RUN="/runs/a", NPROC="2")
    assert run[:6] == ["torchrun", "--nproc-per-node", "2", "-m", "lib.results_table", "--"]
    assert flag(run, "--run") == "/runs/a"


def test_relative_paths_are_the_callers(tmp_path):
    """The scripts work in the repository's folder but run the Python where they were started:
    RUN=r DATA=d from another folder are that folder's r and d, as a script's own flags are;
    a lib/ package of that folder's own does not shadow the repository's."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "__init__.py").write_text("")
    out = subprocess.run(["bash", os.path.join(REPO, "run", "search.sh")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, DRY_RUN="1", RUN="r", DATA="d"))
    assert out.returncode == 0, out.stderr
    (argv,) = [shlex.split(line) for line in out.stdout.splitlines()
               if not line.startswith("[setup]")]
    assert argv[1] == os.path.join(REPO, "search.py")
    assert flag(argv, "--ckpt") == "r/pretrain/best.pt" and flag(argv, "--data-root") == "d"
    (pwd,) = commands("search.sh")  # and the default RUN is the repository's, from anywhere
    assert flag(pwd, "--ckpt") == os.path.join(REPO, "checkpoints", "partseg", "pretrain",
                                                "best.pt")
    # and run for real: eval.py finds the caller's ck.pt (and refuses it for what it holds)
    (tmp_path / "ck.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run(["bash", os.path.join(REPO, "run", "eval.sh"), "ck.pt"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"error: {tmp_path / 'ck.pt'}: not a readable checkpoint" in out.stderr


def test_finetune_refuses_first_last_kept_otherwise_than_searched(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"bits": {}, "keep_first_last": None}))
    with pytest.raises(ValueError, match="not kept.*same --keep-first-last"):
        check_same_keep(PolicyFile(str(policy)), 8)
    policy.write_text(json.dumps({"bits": {}, "keep_first_last": "8"}))
    check_same_keep(PolicyFile(str(policy)), 8)
    with pytest.raises(ValueError, match="at 8 bits"):
        check_same_keep(PolicyFile(str(policy)), None)  # fp32 first/last: larger than searched


def test_finetune_takes_the_method_the_policy_was_searched_with(tmp_path):
    """Its rewards were measured on that weight sharing: a linear search fine-tuned with
    k-means (the flag's usual default) would deliver another model than the one it chose."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"bits": {}, "method": "linear"}))
    assert sharing_method(PolicyFile(str(policy)), None) == "linear"
    assert sharing_method(PolicyFile(str(policy)), "linear") == "linear"
    with pytest.raises(ValueError, match="searched with --method linear; fine-tune with the same"):
        sharing_method(PolicyFile(str(policy)), "kmeans")
    policy.write_text(json.dumps({"bits": {}}))  # a policy that does not record it
    assert sharing_method(PolicyFile(str(policy)), None) == "kmeans"
    assert sharing_method(PolicyFile(str(policy)), "linear") == "linear"
    assert sharing_method(None, None) == "kmeans"  # --bits N


@pytest.mark.parametrize("script", ["demo.sh", "demo_rooms.sh"])
def test_the_demos_can_be_run_again(script):
    """A demo writes fixed run folders; each stage that writes one replaces the previous demo's
    (--overwrite), or a second `bash run/demo_rooms.sh` stopped at its first stage ("already
    holds a run")."""
    with open(os.path.join(REPO, "run", script)) as f:
        text = f.read().replace("\\\n", " ")  # continued lines as one command
    writers = [line for line in text.splitlines()
               if re.match(r"\s*python (pretrain|search|finetune)\.py ", line)]
    assert writers
    for line in writers:
        assert "--overwrite" in shlex.split(line.split(">")[0]), line


def test_a_venv_linked_in_is_ignored_by_git(tmp_path):
    """run/setup_env.sh makes .venv a folder, but a clone may link another checkout's .venv in:
    '.venv/' ignored only a folder, so `git add -A` committed the link, and a checkout of that
    commit replaced the other checkout's ignored .venv folder by a link to itself."""
    with open(os.path.join(REPO, ".gitignore")) as f:
        (tmp_path / ".gitignore").write_text(f.read())
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / ".venv"))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert status.split() == ["??", ".gitignore"]


def test_the_data_hint_names_the_tasks_that_read_each_dataset():
    """A reader's "no layout found" error names the TASK that reads the folder it found
    (lib/data/recognise.RUN_TASKS): the recipes' own --dataset of each TASK."""
    from lib.data.recognise import RUN_TASKS
    read_by = {}
    for task in TASKS:
        (argv,) = commands("pretrain.sh", TASK=task)
        read_by.setdefault(flag(argv, "--dataset"), []).append(task)
    assert {dataset: tuple(tasks) for dataset, tasks in read_by.items()} == RUN_TASKS
