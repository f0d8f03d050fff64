"""The shared loop: one train epoch, one evaluation over a whole split, and `fit`, which runs the
epochs, writes best/last checkpoints atomically and resumes. pretrain.py and finetune.py (and
the HAQ environment's evaluation) all go through here."""
import contextlib
import math
import os
import time
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from lib import distributed
from lib.checkpoint import (checkpoint_epoch, non_finite_entry, rng_state, save_checkpoint,
                            set_rng_state, unwrap)
from lib.cuda_graphs import GraphedTrainStep
from lib.cuda_graphs import wanted as cuda_graphs_wanted
from lib.data.transforms import set_epoch
from lib.metrics import make_metric, metric_key
from lib.tasks import model_inputs, to_device

LOG_EVERY = 10  # training steps between progress-bar and tensorboard updates


def build_optimizer(params, name, lr, weight_decay, momentum=0.9):
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use sgd or adamw")


def build_scheduler(optimizer, name, epochs, steps_per_epoch, warmup_epochs=0.0):
    """Stepped once per optimizer step. cosine: linear warm-up then cosine to 0; step: x0.1 at
    60% and 80% of the epochs (the Point Transformer schedule)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if name == "step":
            return 0.1 ** sum(step >= int(total * f) for f in (0.6, 0.8))
        raise ValueError(f"unknown schedule {name!r}; use cosine or step")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device, enabled, cache=True):
    """bf16 autocast (no grad scaler needed, so the step is never skipped or doubled).
    enabled: None (the scripts' default) on CUDA only; True on the CPU too, where it pays on
    CPUs with native bf16 (AVX512-BF16, AMX: on this project's machine a training step at
    B=16 x 2048 runs 1.1x (tiny PT), 1.2x (default PT) and 2.1x (PCT) its fp32 speed,
    bench/RESULTS.md) and is slower elsewhere; False never. cache=False: no cache of weights
    cast to bf16 (a CUDA graph's capture must not keep or reuse one, lib/cuda_graphs.py)."""
    if enabled is None:
        enabled = device.type == "cuda"
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, task, device, epoch,
                    amp=None, log=None, step_offset=0, graphed=None):
    """One pass over the training loader. loss_fn(logits, batch) -> scalar. graphed: a
    lib.cuda_graphs.GraphedTrainStep of this model and loss, which replays forward and backward
    as a CUDA graph (None: eager).
    Returns {"loss": mean loss, "acc": running point/shape accuracy, "steps_per_s"}."""
    model.train()
    # Running sums stay on the device and are read every LOG_EVERY steps: reading them each
    # step would make the host wait for the GPU after every step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    steps = len(loader)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite loss
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, dynamic_ncols=True,
               disable=not distributed.is_main())
    start = time.perf_counter()
    for step, batch in enumerate(bar):
        batch = to_device(batch, device)
        replayed = graphed(batch) if graphed is not None else None
        if replayed is None:
            with autocast(device, amp):
                logits = model(*model_inputs(batch, task))
                loss = loss_fn(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            loss, logits = replayed
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                    step, first_bad)
            loss_sum += loss.detach().float()
            correct += (logits.argmax(-1) == batch["label"]).sum()
            total += batch["label"].numel()
        if step % LOG_EVERY == 0 or step == steps - 1:
            # every rank's sums in the one exchange the finiteness check makes anyway: the bar
            # shows what the epoch line will (it showed the main rank's alone)
            ranks = distributed.gather_objects(
                (int(first_bad.item()), loss_sum.item(), correct.item(), total))
            _stop_if_not_finite([rank[0] for rank in ranks], epoch, steps)
            _, losses, right, seen = (sum(column) for column in zip(*ranks))
            bar.set_postfix(loss=f"{losses / ((step + 1) * len(ranks)):.4f}",
                            acc=f"{right / max(seen, 1):.3f}")
            if log is not None:
                log.scalars("train_step", {"loss": loss.item(),
                                           "lr": optimizer.param_groups[0]["lr"]},
                            step_offset + step + 1)  # the optimizer steps taken
    elapsed = time.perf_counter() - start
    # The epoch's figures over every rank's batches (each rank ran the same number of steps),
    # as one process would report them.
    ranks = distributed.gather_objects((loss_sum.item(), correct.item(), total))
    loss_total, correct_total, points_total = (sum(column) for column in zip(*ranks))
    return {"loss": loss_total / max(steps * len(ranks), 1),
            "acc": correct_total / max(points_total, 1),
            "steps_per_s": steps / max(elapsed, 1e-9), "lr": optimizer.param_groups[0]["lr"]}


# what a diverged run may do: --resume keeps the recorded rate (and a deterministic run would
# diverge again at the same step)
LOWER_LR = "lower --lr in a new run; --resume keeps the recorded --lr"


def _stop_if_not_finite(first_bad, epoch, steps):
    """first_bad: each rank's first step with a non-finite loss (-1: none), gathered where the
    loop reads its sums anyway (no extra wait for the GPU); the ranks agree, so they stop
    together."""
    bad = [step for step in first_bad if step >= 0]
    if bad:
        bad = min(bad)
        raise FloatingPointError(f"epoch {epoch + 1}, step {bad + 1} of {steps}: the training "
                                 f"loss is not finite; stopped before writing a checkpoint "
                                 f"({LOWER_LR})")


@torch.no_grad()
def evaluate(model, loader, device, amp=None, desc="eval", dataset=None, vote=True, sink=None):
    """Metrics of `model` over the whole split of `loader` (never averaged per batch). Under
    DDP each rank sees its own shard and the accumulators are merged. S3DIS test crops (samples
    with "room"/"index") vote per original point before anything is scored, unless vote=False
    (a subset of the crops: each crop point is scored as it is). `loader` may be any
    iterable of batches (e.g. batches cached on the device) when `dataset` describes them.
    sink: a lib.predictions.PredictionSink that receives the very predictions scored here."""
    dataset = loader.dataset if dataset is None else dataset
    model.eval()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # DDP's first forward after training broadcasts rank 0's buffers, a collective that a
        # rank without a batch (a split smaller than the world) would never join: every rank
        # is here, so they take rank 0's buffers now, and each scores the plain module.
        model = model.module
        distributed.broadcast_buffers(model)
    metric = make_metric(dataset)
    voter = dataset.make_voter() if vote and hasattr(dataset, "make_voter") else None  # S3DIS val/test
    if sink is not None:
        sink.begin(dataset, getattr(loader, "sampler", range(len(dataset))))
    # On a GPU the predictions wait there until the loop ends: scoring a batch on the host
    # would make the host wait for the GPU after every batch instead of queueing the next one.
    pending = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                      disable=not distributed.is_main()):
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits = model(*model_inputs(batch, dataset.task))
        logits = logits.float()
        if voter is not None:
            voter.add(batch["room"], batch["index"], logits)
        else:
            if dataset.task == "partseg":
                pred = metric.predict(logits, batch["category"])
                pending.append(partial(metric.update_predictions, pred, batch["label"],
                                       batch["category"]))
            else:
                pred = logits.argmax(-1)
                pending.append(partial(metric.update, pred, batch["label"]))
            if sink is not None:
                pending.append(partial(sink.add_batch, batch, pred))
        if device.type != "cuda":
            _score(pending)
    _score(pending)
    if voter is not None:
        voter.join_rounds(device)  # the other ranks' last batches
        for room, (pred, label) in enumerate(voter.finish()):
            metric.update(pred, label)
            if sink is not None:
                sink.add_room(room, pred, label)
        return metric.compute()
    if sink is not None:
        sink.gather()
    return _merge_all(distributed.gather_objects(metric)).compute()


def _score(pending):
    """Run the pending metric updates (each copies its batch's predictions to the host)."""
    for update in pending:
        update()
    pending.clear()


def _merge_all(parts):
    first = parts[0]
    for other in parts[1:]:
        first.merge(other)
    return first


def seed_model_draws(seed, epoch):
    """Seed torch's generators (CPU and CUDA), which the model's own draws (Dropout) use, by
    (seed, epoch, process) at the start of each epoch. Seeded once by --seed alone, every
    process of a torchrun run drew the same masks, where one process gives each sample of its
    batch its own; and a resumed run draws as the unbroken one from its first epoch on."""
    state = np.random.SeedSequence((seed, epoch, distributed.rank())).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def fit(model, train_loader, val_loader, optimizer, scheduler, loss_fn, device, epochs, out_dir,
        meta, log, *, resume=None, amp=None, cuda_graphs=None, seed=0, train_files=None):
    """Train to `epochs`, evaluating on the validation split after each epoch. Writes `last.pt`
    every epoch and then `best.pt` when the validation metric improved (main rank). `meta` is
    the checkpoint metadata (model, dataset, args); metrics and epoch are added here.
    `resume` (a last.pt's resume state) continues that run: optimizer, scheduler and RNG as they
    were, log lines of unfinished epochs dropped, and best.pt rewritten if a crash came between
    the last.pt and best.pt writes of its epoch. A non-finite loss or weight stops the run
    (FloatingPointError) before it reaches a checkpoint. cuda_graphs: lib.cuda_graphs.wanted's
    flag (None: on for one CUDA process). seed: the run's --seed (seed_model_draws).
    train_files: the training split's lib/data.file_listing, which last.pt's resume state
    carries so that a resume refused on other files can name them (lib/experiment).
    Returns (best validation score, last validation metrics)."""
    task = train_loader.dataset.task
    key = metric_key(task)
    start_epoch, best, best_epoch = 0, None, None
    if resume is not None:
        start_epoch, best = restore_resume_state(resume, optimizer, scheduler)
        best_epoch = resume.get("best_epoch")
        log.keep_records(start_epoch)
        log.resume_at(start_epoch * len(train_loader))
        problem = (_repair_best(os.path.join(out_dir, "best.pt"), model, meta, resume)
                   if distributed.is_main() else None)
        problem = distributed.gather_objects(problem)[0]  # every rank stops, or none
        if problem:
            raise ValueError(problem)
    val_metrics = None
    graphed = None
    if cuda_graphs_wanted(cuda_graphs, device, distributed.world_size()):
        graphed = GraphedTrainStep(model, loss_fn, task,
                                   partial(autocast, device, amp, cache=False))
    for epoch in range(start_epoch, epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        set_epoch(train_loader.dataset, epoch)  # augmentation drawn by (seed, epoch, sample)
        seed_model_draws(seed, epoch)
        train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, task,
                                      device, epoch, amp, log, step_offset=epoch * len(train_loader),
                                      graphed=graphed)
        check_finite_weights(model, epoch)
        sink = log.prediction_sink()
        val_metrics = evaluate(model, val_loader, device, amp, desc=f"val {epoch}", sink=sink)
        score = val_metrics[key]
        improved = best is None or score > best
        if improved:
            best, best_epoch = score, epoch + 1
        log.record({"epoch": epoch + 1, "train": train_stats, "val": val_metrics, "best": best})
        # The epoch's points, at the optimizer steps taken as the train_step points are (a
        # resume's purge marker, RunLog.resume_at, then hides those of an epoch it runs again),
        # written out before last.pt: a kill after it lost the ones still queued for good.
        steps_done = (epoch + 1) * len(train_loader)
        log.scalars("train", train_stats, steps_done)
        log.scalars("val", dict(val_metrics, **{f"best_{key}": best}), steps_done)
        log.predictions("val", sink, steps_done)
        log.flush_events()
        if distributed.is_main():
            print(f"epoch {epoch + 1}/{epochs}  loss {train_stats['loss']:.4f}  "
                  f"train acc {train_stats['acc']:.4f}  val {key} {score:.4f}  best {best:.4f}  "
                  f"({train_stats['steps_per_s']:.2f} steps/s)", flush=True)
            ckpt_meta = dict(meta, metrics=val_metrics, epoch=epoch + 1)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "best": best, "best_epoch": best_epoch,
                     "metrics": val_metrics, "rng": rng_state()}
            if train_files is not None:
                state["train_files"] = train_files
            # last.pt first: it records which epoch is the best, so a crash before best.pt is
            # written is found and repaired on resume (_repair_best).
            save_checkpoint(os.path.join(out_dir, "last.pt"), unwrap(model), ckpt_meta, state)
            if improved:
                save_checkpoint(os.path.join(out_dir, "best.pt"), unwrap(model), ckpt_meta)
        distributed.barrier()
    return best, val_metrics


def _repair_best(path, model, meta, resume):
    """best.pt as the resumed last.pt says it should be. last.pt is written before best.pt, so
    after a crash between the two best.pt is missing or one improvement behind, and the model
    that belongs there is last.pt's own (the one being resumed). Returns what is wrong if the
    file cannot be repaired, else None."""
    best_epoch = resume.get("best_epoch")
    if best_epoch is None or (os.path.isfile(path) and checkpoint_epoch(path) == best_epoch):
        return None
    if best_epoch != resume["epoch"]:
        found = checkpoint_epoch(path) if os.path.isfile(path) else "nothing"
        return (f"{path}: holds epoch {found}, but the run's best is epoch {best_epoch}: it was "
                f"changed outside the run")
    save_checkpoint(path, unwrap(model), dict(meta, metrics=resume["metrics"], epoch=best_epoch))
    print(f"{path}: rewritten from the resumed last.pt (epoch {best_epoch}; the run had stopped "
          f"before writing it)", flush=True)
    return None


def check_finite_weights(model, epoch):
    name = non_finite_entry(model)
    if name is not None:
        raise FloatingPointError(f"epoch {epoch + 1}: {name} holds NaN or infinite values after "
                                 f"training; stopped before writing a checkpoint ({LOWER_LR})")


def restore_resume_state(resume, optimizer, scheduler):
    """Put optimizer/scheduler/RNG back as they were after the recorded epoch.
    Returns (start_epoch, best)."""
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    # The optimizer comes back with the learning rate of the recorded schedule's next step; a
    # run extended by --epochs has a longer schedule, whose rate for that step is set here (the
    # same value, bit for bit, when the schedule did not change). build_scheduler's LambdaLR.
    lrs = [base * factor(scheduler.last_epoch)
           for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    set_rng_state(resume["rng"])
    return resume["epoch"], resume["best"]
