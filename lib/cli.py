"""The command line every top-level script shares: each flag is defined once here (name, type,
default, help), so it is spelled and checked the same everywhere; a script adds the ones it uses
with `add_flags`. Also the resume contract (`resumed_args`) and the scripts' entry point
(`run_script`)."""
import argparse
import json
import os
import re
import sys
import time

from lib.data import DATASET_NAMES

# What a resumed run may change: how long it goes on and where and how it runs (CUDA graphs
# replay the same kernels). Everything else is the run's recorded setting, and a command line
# that differs is refused.
MAY_CHANGE_AT_RESUME = ("epochs", "episodes", "workers", "device", "cuda_graphs")
METHODS = ("kmeans", "linear")  # lib/quant's weight sharing: k-means centroids, a linear grid


def path_arg(value):
    """Paths are recorded absolute, so a checkpoint means the same from any directory."""
    return os.path.abspath(os.path.expanduser(value))


def _bounded(kind, low, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] ((low, high] with low_open); NaN is refused."""
    bounds = (f"> {low}" if low_open else f">= {low}") + (f" and <= {high}" if high is not None
                                                          else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (value <= low if low_open else value < low) or \
                (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}")
        return value
    return parse


positive_int = _bounded(int, 1)
nonneg_int = _bounded(int, 0)
positive_float = _bounded(float, 0.0, low_open=True)
nonneg_float = _bounded(float, 0.0)
fraction = _bounded(float, 0.0, 1.0)
positive_fraction = _bounded(float, 0.0, 1.0, low_open=True)
bit_width = _bounded(int, 1, 32)


def parse_keep(value):
    """--keep-first-last: 'fp32' -> None (stay fp32), a number -> that bit width, '' -> not kept."""
    if value in (None, "", "none"):
        return "off"
    if value == "fp32":
        return None
    try:
        bits = int(value)
    except ValueError:
        raise ValueError(f"--keep-first-last {value!r}: give a bit width (e.g. 8) or "
                         f"fp32") from None
    if not 1 <= bits <= 32:
        raise ValueError(f"--keep-first-last {bits}: bit width must be within 1..32")
    return bits


def keep_first_last_arg(text):
    """--keep-first-last's argparse type: parse_keep's check as the flags are parsed, so that a
    width no layer can take stops a script before it loads anything (search.py found 33 only at
    its budget check, after the held-out split had loaded: minutes on S3DIS). The text is kept
    as given: runs record it, and parse_keep turns it into a width where it is used."""
    try:
        parse_keep(text)
    except ValueError as e:  # argparse names the flag itself
        raise argparse.ArgumentTypeError(str(e).removeprefix("--keep-first-last ")) from None
    return text


FLAGS = {
    "dataset": (("--dataset",), dict(default="synthetic_parts", choices=DATASET_NAMES,
                                     help="which dataset (reader and label space)")),
    "data_root": (("--data-root",), dict(
        type=path_arg, default=None,
        help="dataset folder; default: the one the checkpoint records, or for pretrain.py "
             "data/<usual folder name> (synthetic data is generated there on first use)")),
    "val_split": (("--val-split",), dict(
        default="auto", choices=["auto", "train-slice", "trainval"],
        help="what validates (and picks best.pt): auto = the val split, or a fixed tenth of "
             "train where no val file is present; train-slice = that tenth always; trainval = "
             "train on train + val (lib/data/val_slice.py)")),
    "num_points": (("--num-points",), dict(
        type=positive_int, default=None,
        help="points per sample; default: the checkpoint's, or the dataset's usual number")),
    "samples_per_epoch": (("--samples-per-epoch",), dict(
        type=positive_int, default=None,
        help="S3DIS: random training crops per epoch (None: about one look at every 4 cm "
             "cell); with --epochs it sets the number of steps")),
    "batch_size": (("--batch-size",), dict(type=positive_int, default=16,
                                           help="samples per batch (per process under torchrun)")),
    "epochs": (("--epochs",), dict(type=nonneg_int, default=20, help="training epochs")),
    "lr": (("--lr",), dict(type=positive_float, default=None,
                           help="learning rate; None: 1e-3 for adamw, 0.05 for sgd")),
    "optimizer": (("--optimizer",), dict(default="adamw", choices=["sgd", "adamw"],
                                         help="sgd (momentum 0.9) or adamw")),
    "weight_decay": (("--weight-decay",), dict(type=nonneg_float, default=1e-4,
                                               help="weight decay")),
    "device": (("--device",), dict(default="auto", choices=["auto", "cpu", "cuda"],
                                   help="auto: CUDA when available, else the CPU")),
    "seed": (("--seed",), dict(type=int, default=0, help="random seed (data order, init)")),
    "workers": (("--workers",), dict(type=nonneg_int, default=0,
                                     help="DataLoader worker processes (0: load in the main one)")),
    "amp": (("--amp",), dict(action=argparse.BooleanOptionalAction, default=None,
                             help="bf16 autocast; None: on CUDA only (eval.py: as the "
                                  "checkpoint's run recorded); --amp: on the CPU too "
                                  "(faster where the CPU has native bf16: AVX512-BF16, AMX); "
                                  "--no-amp: never")),
    "cuda_graphs": (("--cuda-graphs",), dict(
        action=argparse.BooleanOptionalAction, default=None,
        help="replay each training step's forward and backward as a CUDA graph (the same "
             "kernels, without the host launching each one); None: on for one CUDA process, "
             "off under torchrun and on the CPU")),
    "out": (("--out",), dict(type=path_arg, default=None,
                             help="run folder (checkpoints, logs); None: the script's usual "
                                  "place, given in its description")),
    "resume": (("--resume",), dict(
        type=path_arg, default=None,
        help="continue a run: its last.pt (pretrain, finetune), its search_state.pt (search) or "
             "its folder. The run keeps its recorded settings and folder; only "
             + ", ".join("--" + d.replace("_", "-") for d in MAY_CHANGE_AT_RESUME)
             + " may change")),
    "overwrite": (("--overwrite",), dict(action="store_true",
                                         help="replace the run already in --out (its files only)")),
    "keep_first_last": (("--keep-first-last",), dict(
        type=keep_first_last_arg, default="",
        help="keep the first layer and the final classifier at BITS or fp32, outside the policy "
             "('': not kept)")),
    "method": (("--method",), dict(default="kmeans", choices=METHODS,
                                   help="weight sharing: k-means centroids or a linear grid "
                                        "(finetune.py: None, the policy's, else kmeans)")),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every flag's default after its help."""


def make_parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_flags(parser, *names, **helps):
    """Add the shared flags `names` (keys of FLAGS); a script whose default differs follows with
    parser.set_defaults(...), which --help then shows. helps: {name: text} for a flag whose
    shared help would tell another script's story (pretrain.py's --lr default by optimizer)."""
    for name in names:
        options, kwargs = FLAGS[name]
        parser.add_argument(*options, **dict(kwargs, help=helps.get(name, kwargs["help"])))
    return parser


def resolve_device(name):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_amp(amp, device):
    """--amp as a run records it: None (bf16 on CUDA only) decided on the device the run starts
    on. Left None, a run started on a GPU (bf16) and resumed on the CPU (--device may change at
    resume) would go on in fp32, and a search's rewards would mix the two precisions."""
    return device.type == "cuda" if amp is None else amp


def given_dests(parser, argv):
    """The dests of the flags written on the command line (not left at their defaults)."""
    unset = object()
    # argparse fills in a default only where the namespace lacks the attribute.
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions
                                  if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not unset}


def resumed_args(parser, argv, args, kind):
    """The flags of a resumed run: the recorded settings of the run that `args.resume` points
    at, with only MAY_CHANGE_AT_RESUME taken from the command line; the folder is the run's own.
    A different value for any other flag, or a run of another kind, is a one-line ValueError."""
    from lib.rundir import recorded_run
    found, recorded, path, done = recorded_run(args.resume)
    if found != kind:
        raise ValueError(f"{path}: a {found} run; {kind}.py --resume continues a {kind} run")
    if "overwrite" in given_dests(parser, argv):
        raise ValueError("--resume continues the run in its folder; --overwrite would delete it")
    return recorded_settings(parser, argv, args, recorded, path, done)


# The inputs whose contents a run records (SHA-256 of a search's or fine-tune's --ckpt, the
# digest of a fine-tune's --policy) and checks: only these follow a run folder copied or moved
# with them. A --data-root has no such record, so only the same folder is the recorded one.
CONTENT_CHECKED = ("ckpt", "policy")


def path_inside(path, folder):
    """`path` relative to `folder` when it lies inside it, else None."""
    inside = os.path.relpath(path, folder)
    if inside == os.pardir or inside.startswith(os.pardir + os.sep) or os.path.isabs(inside):
        return None
    return inside


def relocated(recorded_path, folder, recorded_folder):
    """Where an input recorded at `recorded_path` by the run then in `recorded_folder` lies for
    the run now in `folder`: at the same place in the run's parent folder (RUN/pretrain/best.pt
    for RUN/search), when it was inside it; None otherwise."""
    if not isinstance(recorded_path, str) or not isinstance(recorded_folder, str):
        return None
    inside = path_inside(recorded_path, os.path.dirname(recorded_folder))
    return None if inside is None else os.path.abspath(os.path.join(os.path.dirname(folder),
                                                                    inside))


def run_input(recorded_path, folder, recorded_folder):
    """The file a run now in `folder` (recorded in `recorded_folder`) reads for an input of
    CONTENT_CHECKED recorded at `recorded_path`: a run folder copied or moved with its inputs
    reads its own (when that file exists), so that a copy never goes back to the original's,
    nor stops when the original is gone; otherwise the recorded path."""
    moved = (isinstance(recorded_folder, str)
             and os.path.realpath(folder) != os.path.realpath(recorded_folder))
    own = relocated(recorded_path, folder, recorded_folder) if moved else None
    return own if own is not None and os.path.exists(own) else recorded_path


def _same_input(dest, path, recorded_path, folder, recorded_folder):
    """Whether the input `path` given for the run in `folder` is the one recorded: the same file
    (through a symlink, or spelled otherwise), or, for CONTENT_CHECKED inputs, the one at the
    same place in a run folder copied or moved with its inputs (relocated)."""
    if not isinstance(recorded_path, str):
        return False
    if os.path.realpath(path) == os.path.realpath(recorded_path):
        return True
    return (dest in CONTENT_CHECKED
            and relocated(recorded_path, folder, recorded_folder) == os.path.abspath(path))


def recorded_settings(parser, argv, args, recorded, path, done, will_train=True, processes=None):
    """The run's settings (a Namespace) for a command line `argv` (parsed: `args`) given to the
    run recorded at `path` (its folder is the run's, `recorded` its flags, `done` its epochs or
    episodes): only MAY_CHANGE_AT_RESUME may differ, and --epochs / --episodes only upwards;
    anything else is a one-line ValueError listing every difference. will_train=False: the
    number of processes is not checked (a finished stage skipped trains nothing). processes:
    the number the command runs under; None: this process's (torchrun's WORLD_SIZE, else 1)."""
    from lib.distributed import launched_world_size
    folder = os.path.dirname(path)
    given = given_dests(parser, argv)
    settings, differences = {}, []
    recorded_processes = recorded.get("processes")
    if processes is None:
        # as init_distributed finds it: a WORLD_SIZE exported in the shell of a plain `python
        # pretrain.py --resume` was counted, refusing a one-process run and letting a
        # two-process one through to train alone
        processes = launched_world_size()
    for action in parser._actions:
        dest = action.dest
        if dest == argparse.SUPPRESS or dest == "help":
            continue
        value = getattr(args, dest)
        recorded_value = recorded.get(dest)
        if recorded_value is None:  # a flag newer than the run, or a default resolved later
            recorded_value = action.default
        flag = action.option_strings[0] if action.option_strings else dest
        if dest == "resume":
            settings[dest] = path
        elif dest == "out":
            if dest in given and os.path.realpath(value) != os.path.realpath(folder):
                differences.append(f"--out {value} (the run's folder is {folder})")
            settings[dest] = folder
        elif dest in given and dest in MAY_CHANGE_AT_RESUME:
            # fewer than set would cut the run short, its schedule squeezed to the new end
            if dest in ("epochs", "episodes") and value < max(done, recorded_value or 0):
                differences.append(f"{flag} {value} (the run is set to {recorded_value} and has "
                                   f"done {done}; extend it with more, or give none)")
            settings[dest] = value
        elif (dest in given and action.type is path_arg and value != recorded_value
              and _same_input(dest, value, recorded_value, folder, recorded.get("out"))):
            settings[dest] = value  # the run's input as this command names it
        elif dest not in given and dest in CONTENT_CHECKED:
            settings[dest] = run_input(recorded_value, folder, recorded.get("out"))
        elif (dest == "batch_size" and not will_train and recorded_processes
              and value * processes == recorded_value * recorded_processes):
            # the run scripts give each of NPROC processes the recipe's total batch / NPROC: a
            # finished stage started again under another NPROC is the same total batch
            settings[dest] = recorded_value
        else:
            if dest in given and value != recorded_value:
                moved = (action.type is path_arg and isinstance(recorded_value, str)
                         and not os.path.exists(recorded_value))
                hint = ("; gone: a link there to the new place is taken as the same"
                        if moved else "")
                differences.append(f"{flag} {value} (recorded {recorded_value}{hint})")
            settings[dest] = recorded_value
    # --batch-size is per process: under another process count the total batch, the steps per
    # epoch and so the schedule would change (runs recorded before the count was are not checked)
    if will_train and recorded_processes is not None and processes != recorded_processes:
        differences.append(f"{processes} process(es) (recorded {recorded_processes}; the batch "
                           f"is per process, so the total batch would change)")
    if differences:
        may_change = [a.option_strings[0] for a in parser._actions
                      if a.dest in MAY_CHANGE_AT_RESUME]
        raise ValueError(f"{path}: a run continued or started again keeps its recorded "
                         f"settings; refused: "
                         f"{'; '.join(differences)} (only {', '.join(may_change)} may change)")
    return argparse.Namespace(**settings)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(message):
    """A message fit for a terminal line: no ANSI escapes, its lines joined, never cut."""
    return " ".join(line.strip() for line in _ANSI.sub("", str(message)).splitlines()
                    if line.strip())


def run_script(main, parser, kind=None, argv=None):
    """A top-level script's entry point: main(parsed flags), with a missing file or a bad value
    reported as one line (`error: ...`, exit status 1) instead of a stack trace. Scripts that
    write a run folder give their `kind`, and `--resume` then means the same for all of them."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
        if kind is not None and args.resume:
            args = resumed_args(parser, argv, args, kind)
            if os.environ.get("RANK", "0") == "0":
                given = given_dests(parser, argv)
                changed = [f"--{d.replace('_', '-')} {getattr(args, d)}"
                           for d in MAY_CHANGE_AT_RESUME if d in given]
                print(f"resuming {args.resume} with its recorded settings"
                      f"{' and ' + ', '.join(changed) if changed else ''}; writing into "
                      f"{args.out}", flush=True)
        main(args)
    except (FileNotFoundError, ValueError, FloatingPointError, OSError) as e:
        # an OSError naming a file the run could not write or read (a full disk, a read-only
        # folder) is one line too; any other keeps its traceback
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and not e.filename:
            raise
        from lib.rundir import release_unused
        release_unused()
        message = (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename
                   and e.strerror else one_line(e))
        _tell_torchrun(f"error: {message}")
        # Under torchrun every rank stops; the main one says why.
        raise SystemExit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)
    except RuntimeError as e:
        if not _peer_stopped(e):
            raise
        # Another process of the run stopped (a one-line error of its own, or a crash) while
        # this one waited on it in a collective: its error is the news, not this traceback.
        from lib.rundir import release_unused
        release_unused()
        raise SystemExit("error: another process of this run stopped first; torchrun's summary "
                         "below names it" if os.environ.get("RANK", "0") == "0" else 1)


# What gloo's collectives raise in a process whose peer has exited (its sockets closed): a read
# that finds the socket closed or reset, or a write into it (writev's EPIPE, "Broken pipe").
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_stopped(error):
    from lib.distributed import launched_world_size
    return launched_world_size() > 1 and any(s in str(error) for s in _PEER_GONE)


def _tell_torchrun(message):
    """Under torchrun, the one-line error goes into the process's error file as well: torchrun's
    failure summary, the last thing printed, then shows it for the process that failed, where
    it otherwise says only "To enable traceback see: ..." (an error only rank 1 found was
    printed nowhere)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:  # torch.distributed.elastic's format, without a traceback
            json.dump({"message": {"message": message,
                                   "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the summary then has no message; the error itself is unaffected
