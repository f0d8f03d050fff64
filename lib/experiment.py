"""Pieces every top-level script builds the same way: datasets and loaders, the model that fits
a dataset, and the metadata a checkpoint records about both."""
import os

import torch

from lib import distributed
from lib.data import DATA_DIR, default_root, listing_changes, listing_sha256, note
from lib.data.val_slice import recorded_val_key, split_with_val_protocol, val_sha256
from lib.distributed import ShardedSampler

MODEL_TASK = {"pt_seg": "partseg", "pt_semseg": "semseg", "pt_cls": "cls", "pct_cls": "cls"}
MODEL_NAMES = [name + size for name in MODEL_TASK for size in ("", "_tiny")]


def model_task(model_name):
    return MODEL_TASK[model_name.removesuffix("_tiny")]


def load_split(dataset_name, root, split, num_points=None, augment=False, seed=0,
               val_split="auto", samples_per_epoch=None, whole_rooms=False):
    """One split, with the validation protocol `val_split` (the scripts' --val-split):
    "auto": the dataset's val split, or, when none of its files is present (a partial
    download), a fixed slice of train (lib/data/val_slice.py), which "train" then leaves out;
    "train-slice": that slice whatever is present; "trainval": "train" reads train + val (the
    protocol some papers train with), "val" stays the val split. Never the test split.
    samples_per_epoch: the length of an S3DIS training epoch (train only). whole_rooms: S3DIS's
    training split read for scoring, every point voted (lib.data.build_dataset)."""
    extra = {"samples_per_epoch": samples_per_epoch} if samples_per_epoch is not None else {}
    if whole_rooms:
        extra["whole_rooms"] = True
    return split_with_val_protocol(dataset_name, root or default_root(dataset_name), split,
                                   val_split, num_points=num_points, augment=augment, seed=seed,
                                   **extra)


def check_training_batch(task, batch_size, processes=1):
    """A classifier's head normalises over the batch (BatchNorm1d on (B, C), synchronised
    across processes): one sample a step is torch's error in the first step, naming no flag."""
    if task == "cls" and batch_size * processes < 2:
        raise ValueError(f"--batch-size {batch_size}: a classifier trains on at least 2 samples "
                         f"a step (its head's BatchNorm normalises over the batch)")


def make_loader(dataset, batch_size, train, seed=0, workers=0):
    """Training loaders shuffle per epoch (seeded) and drop the ragged last batch (BatchNorm
    needs more than one sample); evaluation loaders keep every sample exactly once."""
    if train:
        check_training_batch(getattr(dataset, "task", None), batch_size, distributed.world_size())
    sampler = ShardedSampler(len(dataset), shuffle=train, seed=seed, batch_size=batch_size)
    if train and len(sampler) < batch_size:
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(sampler)} training "
                         f"samples (per process): no training step would run")
    # A training set's workers start afresh each epoch, so they see its epoch (set_epoch).
    # Each new pass draws its workers' seed from `generator`, by default the global generator:
    # a persistent (evaluation) loader draws once per process, so a resumed run with --workers
    # drew once more than the uninterrupted one and every later Dropout mask differed. The
    # samples' randomness is keyed by sample (lib/data/transforms.py), not by these seeds.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       drop_last=train, num_workers=workers,
                                       persistent_workers=workers > 0 and not train,
                                       generator=torch.Generator().manual_seed(seed))


def model_kwargs(model_name, dataset):
    """Constructor arguments of a model for a dataset's label space."""
    if model_task(model_name) != dataset.task:
        # a ValueError, so that a script refusing it removes the run folder it made (run_script)
        raise ValueError(f"model {model_name} is for {model_task(model_name)} but the dataset "
                         f"is a {dataset.task} dataset")
    kwargs = {"in_channels": dataset.in_channels, "num_classes": dataset.num_classes}
    if dataset.task == "partseg":
        kwargs["num_categories"] = len(dataset.category_names)
    return kwargs


def dataset_meta(dataset_name, root, dataset, num_points, seed=0, val_set=None,
                 train_files=None):
    """What a checkpoint records about its data: enough to rebuild the test split and label it,
    and (`seed`, which fixes each validation shape's point subset, and `val_set`'s val_sha256,
    which shapes it holds) the run's val split; `train_files`, the training split's
    lib/data.file_listing, as its SHA-256 (train_files_sha256)."""
    meta = {"name": dataset_name, "root": os.path.abspath(root or default_root(dataset_name)),
            "seed": seed,
            "task": dataset.task, "class_names": list(dataset.class_names),
            "in_channels": dataset.in_channels, "num_points": num_points}
    if hasattr(dataset, "features"):  # normals or xyz: a form without normals feeds xyz
        meta["features"] = dataset.features
    if hasattr(dataset, "val_key"):  # what validated the run (best.pt's choice), and in words
        meta["val_key"], meta["val_source"] = dataset.val_key, dataset.val_source
    if val_set is not None:
        meta["val_sha256"] = val_sha256(val_set)
    if train_files is not None:  # a training run's record
        meta["train_files_sha256"] = listing_sha256(train_files)
    if dataset.task == "partseg":
        meta["category_names"] = list(dataset.category_names)
        meta["part_ranges"] = [list(r) for r in dataset.part_ranges]
    return meta


# What a checkpoint records of its data (dataset_meta's keys) that a run reading it checks: the
# label space, for any run of the model; its inputs (and validation split, val_key), for a
# resumed run.
LABEL_SPACE = (("class_names", "classes"), ("category_names", "category names"),
               ("part_ranges", "part ranges"))
INPUTS = (("in_channels", "input channels"), ("features", "point features"))


def _other(recorded, found, keys):
    """What of `keys` (name, what) `recorded` holds and `found` holds otherwise, in words."""
    return [what for key, what in keys if key in recorded and found.get(key) != recorded[key]]


def check_same_data(path, data, dataset, root):
    """A one-line ValueError when `dataset` (read from `root`) is not the data the checkpoint
    `path` recorded (`data`, dataset_meta's form): other classes, or for part segmentation
    another category list or order (the category enters the model as a one-hot in the category
    file's order), would score every shape against wrong labels, and other point features
    (xyz where it learnt normals) would feed it inputs it never saw."""
    other = _other(data, dataset_meta(data["name"], root, dataset, data["num_points"]),
                   LABEL_SPACE)
    if other:
        raise ValueError(f"{path}: the data at {root} lists other {other[0]} (or another "
                         f"order) than the checkpoint was trained on")
    features = getattr(dataset, "features", None)
    if data.get("features", features) != features:
        raise ValueError(f"{path}: trained with {data['features']} as point features, but the "
                         f"data at {root} ({dataset.layout}) has {features}")


def check_resumed_data(path, recorded, now, resume, steps_per_epoch, val_set=None,
                       train_files=None):
    """A one-line ValueError when a run resumed from `path` would train on other data than it
    recorded: `recorded` / `now` are dataset_meta's records, `resume` the last.pt's resume state
    and `steps_per_epoch` the training loader's length now, `val_set` the validation split now
    (named in the message), `train_files` the training split's lib/data.file_listing now
    (its files named in the message, against the listing the resume state carries). A given
    --data-root must be the recorded folder (lib/cli.recorded_settings), but its contents may
    have changed since (samples added or removed, a training file replaced or edited, a val
    list gone or edited), or a default root find another form of the dataset first: the
    training set, the validation split or the schedule's steps would change silently. (The
    folder itself is not compared: a repository moved elsewhere finds its data/ at another
    path.) A run recorded before val_sha256 or train_files_sha256 is not compared by it."""
    differences = [f"other {what}" for what in _other(recorded, now, LABEL_SPACE + INPUTS)]
    # compared as what the split is (a run recorded before val_key: as its sentence means it),
    # never as words, which may be reworded
    if ("val_key" in recorded or "val_source" in recorded) and \
            recorded_val_key(recorded) != now.get("val_key"):
        differences.append(f"other validation split (now {now.get('val_source')}; recorded "
                           f"{recorded.get('val_source')})")
    elif recorded.get("val_sha256") is not None and recorded["val_sha256"] != now.get("val_sha256"):
        sources = " + ".join(getattr(val_set, "split_sources", None) or ["the data folder"])
        unit = "rooms" if hasattr(val_set, "num_rooms") else "shapes"  # S3DIS scores crops
        count = ("other" if val_set is None else
                 val_set.num_rooms if unit == "rooms" else len(val_set))
        differences.append(f"other validation {unit} (now {count} {unit} from {sources}, not "
                           f"the ones the run validated on)")
    done = resume["scheduler"].get("last_epoch") if isinstance(resume.get("scheduler"),
                                                               dict) else None
    if isinstance(done, int) and resume["epoch"] and done != resume["epoch"] * steps_per_epoch:
        differences.append(f"{steps_per_epoch} training steps an epoch (recorded "
                           f"{done / resume['epoch']:g}: samples added or removed)")
    if recorded.get("train_files_sha256") not in (None, now.get("train_files_sha256")):
        listed = resume.get("train_files")
        differences.append("the training split's files (" + (
            listing_changes(listed, train_files) if listed is not None and train_files is not None
            else "other sizes or names than the run's") + ")")
    if differences:
        raise ValueError(f"{path}: the run's data changed since it started: "
                         f"{'; '.join(differences)}; resume it on the data it trained on, or start "
                         f"a new run")


def evaluate_checkpoint(path, data_root=None, split="test", batch_size=16, device=None,
                        workers=0, amp=None, sink=None):
    """Load any checkpoint (fp32 or packed quantized) and score it on a split of the data it
    records. Returns (meta, results): the task's metrics plus the model's honest size.
    amp: bf16 autocast as lib.train.autocast takes it; None: the run's recorded --amp, so that
    the figures are the ones it recorded (lib/DESIGN.md). sink: a lib.predictions.PredictionSink
    to hand the predictions to."""
    from lib.quant.size import budget_ratio, fp32_size_bytes, honest_size_bytes
    from lib.train import evaluate

    meta, model, _, _ = load_on_every_rank(path)
    data = meta.get("dataset")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the checkpoint records no dataset to score it on")
    missing = [key for key in ("name", "root", "num_points") if key not in data]
    if missing:
        raise ValueError(f"{path}: the checkpoint's dataset record lacks {', '.join(missing)}")
    if amp is None:  # as the run validated and scored itself (its recorded --amp)
        amp = meta.get("args", {}).get("amp")
    # the val split as the run validated on it (its --val-split protocol, and its seed, which
    # fixes the shapes' point subsets), so that eval.py --split val gives the figure best.pt
    # records; test: the same for every run
    seed, protocol = 0, "auto"
    if split == "val":
        seed, protocol = data.get("seed", 0), meta.get("args", {}).get("val_split") or "auto"
    root = data_root or recorded_data_root(path, meta)
    # whole_rooms: S3DIS's training split scored over every point of its rooms, as val and
    # test are (its training form is random crops, some padded with repeats, a sample of it)
    dataset = load_split(data["name"], root, split, data["num_points"], seed=seed,
                         val_split=protocol, whole_rooms=True)
    check_same_data(path, data, dataset, root)
    if split == "val" and data.get("val_sha256") not in (None, val_sha256(dataset)):
        # scored all the same (the data may have changed on purpose), but not as a reproduction
        note(f"[eval] {path}: the val split now holds other shapes or rooms than the run "
             f"validated on (val_sha256), so the figures need not be the checkpoint's metrics")
    device = device or torch.device("cpu")
    model.to(device)
    results = evaluate(model, make_loader(dataset, batch_size, train=False, workers=workers),
                       device, amp, desc=f"eval {split}", sink=sink)
    results["honest_bytes"] = honest_size_bytes(model)
    results["fp32_bytes"] = fp32_size_bytes(model)
    results["budget_ratio"] = budget_ratio(model)
    return meta, results


def recorded_data_root(path, meta):
    """The data folder the checkpoint `path` (whose record is `meta`) was trained on, when it is
    there to read: as recorded, or, for a checkpoint moved with the folder tree it was written
    in (a repository copied to another machine with its checkpoints/ and data/), at the same
    place in the moved tree. A folder inside this repository's data/ is left to the readers,
    which generate synthetic data missing there (the same set: one fixed seed) or say where to
    get a real dataset. Otherwise a one-line FileNotFoundError naming --data-root: synthetic
    data was generated at the foreign path (the default set in place of the one the model was
    trained on) and a real dataset asked for there."""
    data = meta["dataset"]
    root = data["root"]
    if _readable_here(root):
        return root
    moved = _moved_with(path, (meta.get("args") or {}).get("out"), root)
    if moved is not None and _readable_here(moved):
        return moved
    here = default_root(data["name"])
    if data["name"].startswith("synthetic_"):
        hint = f" (this repository's default synthetic set: --data-root {here})"
    else:
        hint = f" (here: --data-root {here}?)" if os.path.isdir(here) else ""
    raise FileNotFoundError(f"{path}: the data folder it records, {root}, does not exist here "
                            f"(a checkpoint from another machine or folder?); give --data-root, "
                            f"the folder of its {data['name']} data{hint}")


def _readable_here(root):
    """A data folder that exists, or one in this repository's data/ (its readers handle it)."""
    from lib.cli import path_inside
    return os.path.exists(root) or path_inside(os.path.realpath(root),
                                               os.path.realpath(DATA_DIR)) is not None


def _moved_with(path, recorded_out, root):
    """Where `root` lies if the checkpoint `path`, written into the folder `recorded_out`, was
    moved with the tree around it: the trailing folder names that the checkpoint's folder now
    and `recorded_out` share are the moved part (checkpoints/demo/pretrain), and what precedes
    them the tree's old and new place. None if `root` was not in that tree."""
    from lib.cli import path_inside
    if not isinstance(recorded_out, str):
        return None
    now, then = os.path.abspath(os.path.dirname(path)), os.path.abspath(recorded_out)
    while os.path.basename(now) and os.path.basename(now) == os.path.basename(then):
        now, then = os.path.dirname(now), os.path.dirname(then)
    if now == then:
        return None
    inside = path_inside(os.path.abspath(root), then)
    return None if inside is None else os.path.join(now, inside)


def load_on_every_rank(path, tries=3):
    """load_checkpoint(path), the same file on every rank, and that file's SHA-256: (meta,
    model, resume state or None, sha256). Each rank opens the path itself, and a run that still
    trains may replace it between two ranks' reads (run/eval.sh scores unfinished stages too; a
    search or fine-tune may start on a best.pt its pretraining still improves): they scored,
    searched or fine-tuned two models, merged into the figures of neither. Each rank hashes the
    file before and after its read, and the ranks read it again until every one read the same
    file whole; its SHA-256 is what a search or fine-tune records of its --ckpt (hashed apart
    from the read, it could be another file's)."""
    from lib.checkpoint import file_sha256, load_checkpoint, require_file
    require_file(path)

    def read():
        before = file_sha256(path)
        meta, model, resume = load_checkpoint(path)
        after = file_sha256(path)
        return meta, model, resume, (after if after == before else None)

    return distributed.same_on_every_rank(path, read, lambda loaded: loaded[3], "a run", tries)


def stand_in_inputs(data_meta, points=1024):
    """Model inputs made up from a checkpoint's dataset record (one cloud of random points, at
    most `points` of them): enough to see which layers the forward calls, before the splits
    load."""
    from lib.tasks import model_inputs
    gen = torch.Generator().manual_seed(0)
    count = min(points, data_meta["num_points"] or points)
    batch = {"xyz": torch.rand(1, count, 3, generator=gen),
             "feat": torch.rand(1, count, data_meta["in_channels"], generator=gen),
             "category": torch.zeros(1, dtype=torch.long)}
    return model_inputs(batch, data_meta["task"])


def example_inputs(dataset, device, n=2):
    """Model inputs for the first n samples (fewer if the split is smaller): used to trace
    layer order and input sizes."""
    from lib.tasks import model_inputs, to_device
    if not len(dataset):
        raise ValueError(f"{getattr(dataset, 'root', 'the dataset')}: no samples to trace the "
                         f"model's layers with")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(min(n, len(dataset)))])
    return model_inputs(to_device(batch, device), dataset.task)
