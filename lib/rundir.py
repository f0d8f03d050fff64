"""The run folder contract, the same for pretrain.py, finetune.py and search.py (README, "Run
folders and resuming"):

- a new run refuses a folder that already holds a run, unless `--overwrite`, which replaces
  that run's files (RUN_FILES, nothing else), or `--resume`, which continues it. The old files
  go only when the new run writes its first file (RunLog calls `clear_replaced`), after every
  input has loaded and every check has passed: a run refused for a typo, a missing policy or
  a batch too large leaves the old run whole;
- `--out` naming a file, or the folder of a file the run reads (its `--ckpt`, a `--policy`), is
  refused, and a missing input file is refused before the folder is made;
- the run holds an exclusive lock on `FOLDER/.lock` for its whole life, so a second process
  writing into the same folder is refused. It is a kernel lock (flock): it goes away with its
  process, so a crashed or killed run leaves no stale lock behind;
- every check comes before anything is written: a refused run touches nothing (a folder it
  made to claim is removed again, `release_unused`).

Every run records a random `run_id` among its flags (args.json, every checkpoint's
meta["args"], a search's search_state.pt), kept when it resumes: a last.pt and a best.pt of two
runs in one folder (a file copied in from another run) are refused (`check_one_run`), and so is
a search_state.pt beside the args.json of another search (`check_one_search`), while a folder
copied or moved whole carries its run on. Runs from before the id are not checked.

`recorded_run` reads what a `--resume` path points at; lib/cli.py's `resumed_args` turns it
into the resumed run's flags. Under torchrun only the main rank checks and holds the lock; the other ranks follow its verdict.
"""
import fcntl
import json
import os
import secrets
import shutil

from lib import distributed
from lib.checkpoint import TEMP_PREFIX

LOCK_NAME = ".lock"
# What the scripts write into a run folder; any of the first group means "a run lives here".
RUN_MARKERS = ("args.json", "last.pt", "best.pt", "search_state.pt", "policy.json")
RUN_FILES = RUN_MARKERS + ("log.jsonl", "episodes.jsonl", "log.txt", "best_test.json",
                           "policy.png", "baselines.md", "baselines.json")
RUN_DIRS = ("tb",)

_held = {}  # folder -> open lock file, kept open (and so locked) until the process ends
_replaced = set()  # folders whose previous run --overwrite replaces at the first write
_made = {}  # folder this process created to claim it -> the parents it created with it


def claim(out, resume=False, overwrite=False, inputs=()):
    """Check `out` against the contract and take its lock; `inputs`: (flag, path) of each file
    the run reads. Returns the folder as an absolute path. A refusal is a one-line ValueError
    on every rank."""
    out = os.path.abspath(out)
    problem = None
    if distributed.is_main():
        try:
            _claim(out, resume, overwrite, [(flag, path) for flag, path in inputs if path])
        except ValueError as e:
            problem = str(e)
    problem = distributed.gather_objects(problem)[0]
    if problem:
        raise ValueError(problem)
    return out


def _claim(out, resume, overwrite, inputs):
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, not a run folder")
    for flag, path in inputs:
        if os.path.isdir(path) and flag == "--policy":  # a search folder for its policy.json
            held = os.path.isfile(os.path.join(path, "policy.json"))
            raise ValueError(f"{path}: a folder, not a policy file (given as --policy)"
                             f"{'; give its policy.json' if held else ''}")
        if os.path.isdir(path):  # a run folder given for the checkpoint in it
            from lib.checkpoint import require_file
            try:
                require_file(path)
            except ValueError as e:
                raise ValueError(f"{e} (given as {flag})") from None
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file (given as {flag})")
        if os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(out):
            raise ValueError(f"--out {out}: holds {os.path.basename(path)}, which this run reads "
                             f"({flag}); write the run into another folder (by default a "
                             f"subfolder of that one)")
    found = [name for name in RUN_MARKERS if os.path.exists(os.path.join(out, name))]
    saved = [name for name in found if name != "args.json"]
    if saved and not (resume or overwrite):
        # only a search_state.pt or a last.pt with an optimizer state can be continued: a
        # fine-tune with --epochs 0 saves its last.pt packed, without one (recorded_run)
        from lib.quant.pack import is_packed
        last = os.path.join(out, "last.pt")
        resumable = ("search_state.pt" in saved
                     or ("last.pt" in saved and not is_packed(last)))
        raise ValueError(f"--out {out}: already holds a run ({', '.join(found)}); "
                         f"{'continue it with --resume, ' if resumable else ''}choose another "
                         f"--out, or replace it with --overwrite")
    lock(out)
    if found and not saved and not (resume or overwrite):
        # a run stopped or killed before its first checkpoint (the lock says none is running):
        # nothing of it to lose, so it starts again, as the run scripts do (lib/stage_status)
        print(f"--out {out}: its run saved nothing (args.json, no checkpoint); starting again",
              flush=True)
        overwrite = True
    # a write killed between its temporary file and the rename left the temporary behind
    # (lib/checkpoint.atomic_write); with the lock held, no live writer owns one
    for name in os.listdir(out):
        if name.startswith(TEMP_PREFIX) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if overwrite and not resume:
        _replaced.add(os.path.realpath(out))


def clear_replaced(out):
    """Remove the files of the run that --overwrite replaces (RUN_FILES and RUN_DIRS, nothing
    else); called at the new run's first write."""
    folder = os.path.realpath(out)
    if folder not in _replaced:
        return
    _replaced.discard(folder)
    for name in RUN_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
    for name in RUN_DIRS:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def lock(folder):
    """Hold FOLDER/.lock (exclusive, non-blocking) until the process ends; ValueError naming the
    holder if another process has it."""
    folder = os.path.realpath(folder)
    if folder in _held:
        return
    if not os.path.isdir(folder):
        parents, parent = [], os.path.dirname(folder)
        while not os.path.exists(parent):  # made by makedirs below, deepest first
            parents.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(folder)
        _made[folder] = parents
    path = os.path.join(folder, LOCK_NAME)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{folder}: in use by {holder} (lock {path}); wait for it to end or "
                         f"choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _held[folder] = f


def _let_go_in_child():
    """A forked child (a DataLoader worker) closes its copies of the held locks. An flock lives
    as long as any descriptor of it is open, so a kill -9 of the run left its folder locked, in
    the name of the dead process, until its workers noticed and ended. Closing a copy never
    unlocks the parent's."""
    for f in _held.values():
        f.close()
    _held.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def lock_holder(folder):
    """Who holds FOLDER/.lock ("process N on HOST"), or None when no other process does. Probed
    with a shared lock, let go at once: a run claiming the folder in that very instant would be
    refused as if it were in use, so it is asked only to explain a refusal or to say whether a
    run is still going (lib/stage_status, just before a run script starts the stage)."""
    path = os.path.join(folder, LOCK_NAME)
    if os.path.realpath(folder) in _held or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:  # unreadable (another user's folder): nothing to tell
        return None
    return None


def release_unused():
    """For a run stopped by an error: remove each folder it created whose only file is still its
    lock (a refusal after the claim, e.g. a missing data root, leaves no empty run folder)."""
    for folder, parents in list(_made.items()):
        del _made[folder]
        if os.path.isdir(folder) and os.listdir(folder) == [LOCK_NAME]:
            _held.pop(folder).close()
            os.remove(os.path.join(folder, LOCK_NAME))
            os.rmdir(folder)
            for parent in parents:  # and the parents made for it, while nothing else is there
                if os.listdir(parent):
                    break
                os.rmdir(parent)


def recorded_run(path):
    """What `--resume path` continues: (kind, recorded settings, resolved path, done), kind
    being "pretrain" or "finetune" (a last.pt) or "search" (search_state.pt), done the epochs or
    episodes it has finished; a run folder stands for the file in it. One-line errors for
    anything that cannot be resumed."""
    from lib.checkpoint import torch_load
    from lib.quant.pack import is_packed
    if os.path.isdir(path):
        for name in ("search_state.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            holder = lock_holder(path)
            if holder:  # a run that has not saved its first state yet
                raise ValueError(f"{path}: in use by {holder}, which has saved nothing to resume "
                                 f"yet; wait for it to end")
            raise FileNotFoundError(f"{path}: a folder without last.pt or search_state.pt to "
                                    f"resume")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    obj = None if is_packed(path) else torch_load(path)
    if isinstance(obj, dict) and "agent" in obj:
        if "args" not in obj:
            raise ValueError(f"{path}: a search state without its recorded settings (written by "
                             f"an older search.py); it cannot be resumed")
        check_one_search(path, obj["args"])
        return "search", obj["args"], path, obj["episode"]
    if not isinstance(obj, dict) or "resume" not in obj or "meta" not in obj:
        raise ValueError(f"{path}: holds no optimizer state to resume from (a best.pt never "
                         f"does, nor a fine-tune's with --epochs 0; resume from the last.pt of a "
                         f"run that trained)")
    meta = obj["meta"]
    check_one_run(path, meta)
    return (("finetune" if meta.get("quant") else "pretrain"), meta.get("args", {}), path,
            obj["resume"]["epoch"])


def run_id(recorded_args=None):
    """The `run_id` a run records: a resumed run's own (`recorded_args`: its last.pt's flags);
    for a new run, or one recorded before runs had an id, a new random one, rank 0's on every
    rank."""
    recorded = recorded_args.get("run_id") if isinstance(recorded_args, dict) else None
    return recorded or distributed.broadcast_object(secrets.token_hex(8))


def _run_id_of(meta):
    args = meta.get("args") if isinstance(meta, dict) else None
    return args.get("run_id") if isinstance(args, dict) else None


def check_one_run(last_path, last_meta):
    """A one-line ValueError when the best.pt beside `last_path` (whose meta is `last_meta`)
    was written by another run. A last.pt copied in from another run, whose best epoch was the
    one best.pt holds, was resumed beside this run's best.pt (or its stage taken as ended), and
    the folder's best.pt then was not the best of the run that went on."""
    from lib.checkpoint import checkpoint_meta
    best_path = os.path.join(os.path.dirname(last_path), "best.pt")
    ours = _run_id_of(last_meta)
    if ours is None or not os.path.isfile(best_path):
        return
    theirs = _run_id_of(checkpoint_meta(best_path))
    if theirs is not None and theirs != ours:
        raise ValueError(f"{best_path}: written by another run (run_id {theirs}) than "
                         f"{os.path.basename(last_path)} beside it (run_id {ours}); a folder holds "
                         f"one run: move the file that does not belong to it away")


# what args.json holds beside a run's flags, or a resumed start changes: not the search's settings
NOT_SETTINGS = ("run_id", "git_commit", "resume")


def check_one_search(state_path, state_args):
    """A one-line ValueError, naming the settings that differ, when the args.json beside
    `state_path` (the flags of the folder's latest start, whose search_state.pt records
    `state_args`) was written by another search. A search_state.pt copied in from another search
    (another --ckpt, --preserve-ratio or --seed) was resumed with its own settings, silently:
    the folder's episodes.jsonl, tensorboard events and policy.json then held two searches."""
    args_path = os.path.join(os.path.dirname(state_path), "args.json")
    ours = state_args.get("run_id") if isinstance(state_args, dict) else None
    if ours is None or not os.path.isfile(args_path):
        return
    try:
        with open(args_path) as f:
            folder_args = json.load(f)
    except (OSError, ValueError):  # unreadable: nothing to compare with
        return
    theirs = folder_args.get("run_id") if isinstance(folder_args, dict) else None
    if theirs is None or theirs == ours:
        return
    differing = [f"--{name.replace('_', '-')} {state_args[name]} (args.json: {folder_args[name]})"
                 for name in sorted(set(state_args) & set(folder_args))
                 if name not in NOT_SETTINGS and state_args[name] != folder_args[name]]
    raise ValueError(f"{state_path}: written by another search (run_id {ours}) than the one "
                     f"{args_path} records (run_id {theirs})"
                     f"{'; it has ' + ', '.join(differing) if differing else ''}; a folder holds "
                     f"one search: move the file that does not belong to it away")
