"""What the run scripts (run/pretrain.sh, search.sh, finetune.sh) do with a stage's folder when
they are started again, e.g. after a crash or a kill:

    WORLD_SIZE=NPROC python -m lib.stage_status FOLDER SCRIPT FLAGS...    # prints one line:

    new          no run in it, or FLAGS hold --overwrite: run the command as it is
    finished     its run ended, and FLAGS ask nothing of it that it did not do: skip the stage
    resume PATH  its run was interrupted, or FLAGS extend it (--epochs / --episodes): continue
                 it from PATH (last.pt or search_state.pt)
    restart      its run was interrupted before it wrote anything to continue from (a fine-tune
                 with --epochs 0, which trains nothing, or a run killed before its first
                 checkpoint): start it again over its own files (--overwrite)
    refuse WHY   the scripts stop with WHY: FLAGS change a recorded setting (lib/cli's
                 resume rules), an input the run recorded has changed since (a search's
                 --ckpt, a fine-tune's --ckpt by SHA-256 or --policy by digest: a pretraining
                 extended or a policy searched again after the stage ran), or the folder holds a
                 result without the record of whether its run ended (a best.pt without
                 last.pt, a policy.json without search_state.pt), which starting over would
                 delete, or a live process holds the folder's lock (lib/rundir): its run is
                 still going (e.g. started from another terminal, or, off Linux, the workers
                 of a torchrun whose launcher was killed: on Linux they end with it,
                 lib/distributed.end_with_launcher), and a resume would only be refused by
                 the lock

A run has ended when it has done its recorded epochs (episodes) and written what it writes last:
a fine-tune its best_test.json, a search its baselines.json; a pretraining's best.pt must also
be the epoch its last.pt names as best (a kill between the two is repaired by resuming).
lib/results_table marks the rows of stages whose `progress` is not "ended". Whether the run is
still going is the lock's to say, not its files': a run killed and a run still writing leave the
same files behind.
"""
import argparse
import importlib
import os
import sys
from typing import NamedTuple, Optional

from lib.rundir import LOCK_NAME, RUN_MARKERS, check_one_run, check_one_search, lock_holder


class Progress(NamedTuple):
    """How far the run in a folder got. state: "new", "ended", "interrupted", "restartable"
    (interrupted, nothing to continue from), "unknown" (results without the record of whether
    their run ended) or "running" (a live process holds the folder's lock); path: the file that
    records the run (to continue from, when `resumable`); why: the interruption, or the process
    still running, in words; recorded: the run's flags; done: its epochs or episodes
    (`count` says which); inputs: {flag's dest: what the run recorded of that input
    (input_digest)}."""
    state: str
    path: Optional[str] = None
    why: Optional[str] = None
    recorded: Optional[dict] = None
    done: int = 0
    count: str = "epochs"
    resumable: bool = False
    inputs: Optional[dict] = None


def recorded_inputs(quant):
    """{dest: SHA-256 or digest} of the inputs a fine-tune's quant record names (None: not
    recorded, a run from before the record)."""
    quant = quant if isinstance(quant, dict) else {}
    return {"ckpt": quant.get("teacher_sha256"), "policy": quant.get("policy_digest")}


def input_digest(dest, path):
    """What a run records of its input `dest` at `path`: a checkpoint's SHA-256, a policy's
    digest (lib/policy_file.policy_digest)."""
    from lib.checkpoint import file_sha256
    from lib.policy_file import PolicyFile
    return PolicyFile(path).digest if dest == "policy" else file_sha256(path)


def progress(folder):
    """The Progress of the run in `folder`, each of its records read once."""
    from lib.checkpoint import checkpoint_epoch, checkpoint_meta, torch_load
    from lib.quant.pack import is_packed
    holder = lock_holder(folder)
    if holder:  # whatever its files say now, they are a live run's, not yet its last
        return Progress("running", why=f"still running as {holder}")
    present = [name for name in RUN_MARKERS if os.path.exists(os.path.join(folder, name))]
    if not present:
        return Progress("new")
    state_path = os.path.join(folder, "search_state.pt")
    if os.path.isfile(state_path):
        state = torch_load(state_path)
        if not (isinstance(state, dict) and "episode" in state
                and isinstance(state.get("args", {}), dict)):
            raise ValueError(f"{state_path}: not a search state")
        recorded, done = state.get("args", {}), state["episode"]
        check_one_search(state_path, recorded)  # the folder's args.json must be this search's
        run = Progress("ended", state_path, None, recorded, done, "episodes", resumable=True,
                       inputs={"ckpt": state.get("ckpt_sha256")})
        episodes = recorded.get("episodes")
        if episodes is not None and done < episodes:
            return run._replace(state="interrupted", why=f"episode {done} of {episodes}")
        if not os.path.isfile(os.path.join(folder, "baselines.json")):
            return run._replace(state="interrupted", why="its baselines were not written")
        return run
    last_path, best_path = (os.path.join(folder, name) for name in ("last.pt", "best.pt"))
    # a fine-tune with --epochs 0 writes its last.pt packed, as its best.pt, and without the
    # optimizer state a resume needs
    if os.path.isfile(last_path) and not is_packed(last_path):
        last = torch_load(last_path)
        if not (isinstance(last, dict) and isinstance(last.get("meta"), dict)
                and isinstance(last.get("resume"), dict) and "epoch" in last["resume"]):
            raise ValueError(f"{last_path}: not a last.pt of pretrain.py or finetune.py")
        meta, resume = last["meta"], last["resume"]
        check_one_run(last_path, meta)  # best.pt must be this run's to end it
        recorded, done = meta.get("args", {}), resume["epoch"]
        run = Progress("ended", last_path, None, recorded, done, "epochs", resumable=True,
                       inputs=recorded_inputs(meta.get("quant")))
        epochs = recorded.get("epochs")
        if epochs is not None and done < epochs:
            return run._replace(state="interrupted", why=f"epoch {done} of {epochs}")
        if meta.get("quant"):
            if not os.path.isfile(os.path.join(folder, "best_test.json")):
                return run._replace(state="interrupted", why="its test scoring did not end")
        elif not (os.path.isfile(best_path)
                  and checkpoint_epoch(best_path) == resume.get("best_epoch")):
            return run._replace(state="interrupted", why="its best.pt is not the best epoch's")
        return run
    if os.path.isfile(last_path):  # packed: a fine-tune with --epochs 0
        if os.path.isfile(os.path.join(folder, "best_test.json")):
            meta = checkpoint_meta(best_path)
            return Progress("ended", best_path, None, meta.get("args", {}), meta.get("epoch", 0),
                            inputs=recorded_inputs(meta.get("quant")))
        return Progress("restartable", why="its test scoring did not end")
    if not any(name in present for name in ("best.pt", "policy.json")):
        return Progress("restartable", why="killed before its first checkpoint")
    return Progress("unknown")


def stage_status(folder, script, argv):
    """The action (module doc) for the command `script.py argv` that writes `folder`, run under
    WORLD_SIZE processes (1 when unset)."""
    argv = list(argv)
    if "--overwrite" in argv:
        return "new"
    run = progress(folder)
    if run.state == "running":
        return f"refuse {still_running(folder, run)}"
    if run.state == "new":
        return "new"
    if run.state == "restartable":
        return "restart"
    if run.state == "unknown":
        found = [name for name in RUN_MARKERS if os.path.exists(os.path.join(folder, name))]
        return (f"refuse {folder} holds {', '.join(found)} without the last.pt or "
                f"search_state.pt that says whether its run ended; move it away, or give "
                f"--overwrite to replace it")
    from lib.cli import recorded_settings
    parser = importlib.import_module(script).get_args_parser()
    # the processes the command will run under: run/recipes.sh gives its NPROC as WORLD_SIZE
    # (without torchrun's RANK, which would make this process count as launched alone)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parser.parse_args(argv)
        settings = recorded_settings(parser, argv, args, run.recorded, run.path, run.done,
                                     will_train=False, processes=processes)
    except ValueError as e:
        return f"refuse {e}"
    changed = changed_inputs(run, settings, parser)
    if changed:
        return (f"refuse {folder}: inputs its run read have changed since: "
                f"{'; '.join(changed)}; give --overwrite to run the stage again on them as they "
                f"are now, or move the folder away")
    # a fine-tune with --epochs 0 (its packed best.pt stands for the run) has nothing to extend
    extended = run.resumable and getattr(settings, run.count, run.done) > run.done
    if run.state == "interrupted" or extended:
        try:  # now under the process count too: it trains
            recorded_settings(parser, argv, args, run.recorded, run.path, run.done,
                              processes=processes)
        except ValueError as e:
            return f"refuse {e}"
        return f"resume {run.path}"
    return "finished"


def still_running(folder, run):
    """Why a stage whose folder a live process holds is neither resumed nor read, in words."""
    return (f"{folder}: {run.why}, which holds its {LOCK_NAME}; wait for it to end, or stop it "
            f"(under torchrun: its worker processes, not only the launcher)")


def changed_inputs(run, settings, parser):
    """["FLAG PATH (why)", ...] of the inputs that differ from what the run recorded of them
    (input_digest), or are gone: a stage that ended on them is not this command's result, and
    an interrupted one would go on from another model or policy."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    changed = []
    for dest, recorded in (run.inputs or {}).items():
        path = getattr(settings, dest, None)
        if recorded is None or path is None:
            continue
        if not os.path.isfile(path):
            changed.append(f"{flags.get(dest, dest)} {path} (missing)")
        elif input_digest(dest, path) != recorded:
            what = "another policy" if dest == "policy" else "another model: its SHA-256 differs"
            changed.append(f"{flags.get(dest, dest)} {path} ({what})")
    return changed


def main(argv):
    """FOLDER SCRIPT FLAGS...: the action; --progress FOLDER: progress's state alone (what a
    stage reading FOLDER's result checks). A damaged folder, or one a live process holds (its
    result still being written): "refuse" and the reason."""
    if len(argv) < 2:
        raise SystemExit("usage: python -m lib.stage_status FOLDER SCRIPT [FLAGS...] | "
                         "--progress FOLDER")
    folder = argv[1] if argv[0] == "--progress" else argv[0]
    try:
        if argv[0] == "--progress":
            run = progress(folder)
            print(f"refuse {still_running(folder, run)}" if run.state == "running" else run.state)
        else:
            print(stage_status(folder, argv[1], argv[2:]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError,
            argparse.ArgumentError) as e:  # damaged records, an unknown script
        from lib.cli import one_line
        print(f"refuse {folder}: {one_line(e)}")


if __name__ == "__main__":
    main(sys.argv[1:])
