"""What the run scripts (run/pretrain.sh, search.sh, finetune.sh) do with a stage's folder when
they are started again, e.g. after a crash or a kill:

    new          no run in it: start the stage
    finished     its run ended: skip the stage (its files stay as they are)
    resume PATH  its run was interrupted: continue it from PATH (last.pt or search_state.pt),
                 with the recorded settings (a changed one is refused, lib/cli.resumed_args)
    restart      its run was interrupted before anything it could continue from was written
                 (a fine-tune with --epochs 0, which trains nothing, or a run killed before its
                 first checkpoint): start it again over its files (--overwrite)

    python -m lib.stage_status FOLDER     # prints one of the lines above

A run has ended when it has done its recorded epochs (episodes) and written what it writes
last: a fine-tune its best_test.json, a search its baselines.json; a pretraining's best.pt must
also be the epoch its last.pt names as best (a kill between the two is repaired by resuming).
"""
import os
import sys

from lib.rundir import RUN_MARKERS


def stage_status(folder):
    from lib.checkpoint import checkpoint_epoch, torch_load
    from lib.quant.pack import is_packed
    if not any(os.path.exists(os.path.join(folder, name)) for name in RUN_MARKERS):
        return "new"
    state_path = os.path.join(folder, "search_state.pt")
    if os.path.isfile(state_path):
        state = torch_load(state_path)
        episodes = state.get("args", {}).get("episodes")  # None: older than the record
        ended = (episodes is not None and state["episode"] >= episodes
                 and os.path.isfile(os.path.join(folder, "baselines.json")))
        return "finished" if ended else f"resume {state_path}"
    last_path = os.path.join(folder, "last.pt")
    best_path = os.path.join(folder, "best.pt")
    # a fine-tune with --epochs 0 writes its last.pt packed, as its best.pt, and without the
    # optimizer state a resume needs
    if os.path.isfile(last_path) and not is_packed(last_path):
        last = torch_load(last_path)
        meta, resume = last["meta"], last["resume"]
        ended = resume["epoch"] >= meta["args"]["epochs"]
        if meta.get("quant"):
            ended = ended and os.path.isfile(os.path.join(folder, "best_test.json"))
        else:
            ended = ended and os.path.isfile(best_path) and (
                checkpoint_epoch(best_path) == resume.get("best_epoch"))
        return "finished" if ended else f"resume {last_path}"
    if os.path.isfile(best_path) and os.path.isfile(os.path.join(folder, "best_test.json")):
        return "finished"  # a fine-tune with --epochs 0
    return "restart"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m lib.stage_status FOLDER")
    print(stage_status(sys.argv[1]))
