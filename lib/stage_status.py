"""What the run scripts (run/pretrain.sh, search.sh, finetune.sh) do with a stage's folder when
they are started again, e.g. after a crash or a kill:

    python -m lib.stage_status FOLDER SCRIPT FLAGS...    # prints one line:

    new          no run in it, or FLAGS hold --overwrite: run the command as it is
    finished     its run ended, and FLAGS ask nothing of it that it did not do: skip the stage
    resume PATH  its run was interrupted, or FLAGS extend it (--epochs / --episodes): continue
                 it from PATH (last.pt or search_state.pt)
    restart      its run was interrupted before it wrote anything to continue from (a fine-tune
                 with --epochs 0, which trains nothing, or a run killed before its first
                 checkpoint): start it again over its own files (--overwrite)
    refuse WHY   the scripts stop with WHY: FLAGS change a recorded setting (lib/cli's
                 resume rules), or the folder holds a result without the record of whether
                 its run ended (a best.pt without last.pt, a policy.json without
                 search_state.pt), which starting over would delete

A run has ended when it has done its recorded epochs (episodes) and written what it writes last:
a fine-tune its best_test.json, a search its baselines.json; a pretraining's best.pt must also
be the epoch its last.pt names as best (a kill between the two is repaired by resuming).
lib/results_table marks the rows of stages whose `progress` is not "ended".
"""
import argparse
import importlib
import os
import sys

from lib.rundir import RUN_MARKERS


def progress(folder):
    """(state, path, why) of the run in `folder`: state "new", "ended", "interrupted" (path: the
    file to continue from), "restartable" (interrupted, nothing to continue from) or "unknown"
    (results without the record of whether their run ended); why: the interruption in words."""
    from lib.checkpoint import checkpoint_epoch, torch_load
    from lib.quant.pack import is_packed
    present = [name for name in RUN_MARKERS if os.path.exists(os.path.join(folder, name))]
    if not present:
        return "new", None, None
    state_path = os.path.join(folder, "search_state.pt")
    if os.path.isfile(state_path):
        state = torch_load(state_path)
        if not isinstance(state, dict) or "episode" not in state:
            raise ValueError(f"{state_path}: not a search state")
        done, episodes = state["episode"], state.get("args", {}).get("episodes")
        if episodes is not None and done < episodes:
            return "interrupted", state_path, f"episode {done} of {episodes}"
        if not os.path.isfile(os.path.join(folder, "baselines.json")):
            return "interrupted", state_path, "its baselines were not written"
        return "ended", state_path, None
    last_path, best_path = (os.path.join(folder, name) for name in ("last.pt", "best.pt"))
    # a fine-tune with --epochs 0 writes its last.pt packed, as its best.pt, and without the
    # optimizer state a resume needs
    if os.path.isfile(last_path) and not is_packed(last_path):
        last = torch_load(last_path)
        if not isinstance(last, dict) or "meta" not in last or "resume" not in last:
            raise ValueError(f"{last_path}: not a last.pt of pretrain.py or finetune.py")
        meta, resume = last["meta"], last["resume"]
        done, epochs = resume["epoch"], meta.get("args", {}).get("epochs")
        if epochs is not None and done < epochs:
            return "interrupted", last_path, f"epoch {done} of {epochs}"
        if meta.get("quant"):
            if not os.path.isfile(os.path.join(folder, "best_test.json")):
                return "interrupted", last_path, "its test scoring did not end"
        elif not (os.path.isfile(best_path)
                  and checkpoint_epoch(best_path) == resume.get("best_epoch")):
            return "interrupted", last_path, "its best.pt is not the best epoch's"
        return "ended", last_path, None
    if os.path.isfile(last_path):  # packed: a fine-tune with --epochs 0
        if os.path.isfile(os.path.join(folder, "best_test.json")):
            return "ended", best_path, None
        return "restartable", None, "its test scoring did not end"
    if not any(name in present for name in ("best.pt", "policy.json")):
        return "restartable", None, "killed before its first checkpoint"
    return "unknown", None, None


def stage_status(folder, script, argv):
    """The action (module doc) for the command `script.py argv` that writes `folder`."""
    argv = list(argv)
    if "--overwrite" in argv:
        return "new"
    state, path, _ = progress(folder)
    if state == "new":
        return "new"
    if state == "restartable":
        return "restart"
    if state == "unknown":
        found = [name for name in RUN_MARKERS if os.path.exists(os.path.join(folder, name))]
        return (f"refuse {folder} holds {', '.join(found)} without the last.pt or "
                f"search_state.pt that says whether its run ended; move it away, or give "
                f"--overwrite to replace it")
    from lib.cli import recorded_settings
    from lib.checkpoint import checkpoint_meta, torch_load
    parser = importlib.import_module(script).get_args_parser()
    args = parser.parse_args(argv)
    if path.endswith("search_state.pt"):
        state_record = torch_load(path)
        recorded, done, count = state_record.get("args", {}), state_record["episode"], "episodes"
    else:
        meta = checkpoint_meta(path)
        recorded, done, count = meta.get("args", {}), meta.get("epoch", 0), "epochs"
    try:
        settings = recorded_settings(parser, argv, args, recorded, path, done)
    except ValueError as e:
        return f"refuse {e}"
    # a fine-tune with --epochs 0 (its packed best.pt stands for the run) has nothing to extend
    extendable = not path.endswith("best.pt") and getattr(settings, count, done) > done
    if state == "interrupted" or extendable:
        return f"resume {path}"
    return "finished"


def main(argv):
    """FOLDER SCRIPT FLAGS...: the action; --progress FOLDER: progress's state alone (what a
    stage reading FOLDER's result checks). A damaged folder: "refuse" and the reason."""
    if len(argv) < 2:
        raise SystemExit("usage: python -m lib.stage_status FOLDER SCRIPT [FLAGS...] | "
                         "--progress FOLDER")
    folder = argv[1] if argv[0] == "--progress" else argv[0]
    try:
        print(progress(folder)[0] if argv[0] == "--progress"
              else stage_status(folder, argv[1], argv[2:]))
    except (OSError, ValueError, KeyError, argparse.ArgumentError) as e:
        from lib.cli import one_line
        print(f"refuse {folder}: {one_line(e)}")


if __name__ == "__main__":
    main(sys.argv[1:])
