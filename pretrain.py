"""Train a point-cloud model in fp32. Single process on CPU or one GPU, or several GPUs with
`torchrun --nproc-per-node N pretrain.py ...` (DDP).

    python pretrain.py --model pt_seg_tiny --dataset synthetic_parts --epochs 10 --out checkpoints/run

The run folder (--out) defaults to checkpoints/<model>_<dataset>.
"""
import os

import torch

from lib import distributed, heap
from lib.checkpoint import load_checkpoint, unwrap
from lib.cli import (add_flags, make_parser, nonneg_float, resolve_amp, resolve_device,
                     run_script)
from lib.cuda_graphs import wanted as cuda_graphs_wanted
from lib.data import file_listing
from lib.experiment import (MODEL_NAMES, check_resumed_data, dataset_meta, load_split,
                            make_loader, model_kwargs)
from lib.rundir import claim, run_id
from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import build_optimizer, build_scheduler, fit
from models import build_model


def get_args_parser():
    p = make_parser(__doc__)
    p.add_argument("--model", default="pt_seg_tiny", choices=MODEL_NAMES,
                   help="network; the _tiny presets are small enough for a CPU")
    add_flags(p, "dataset", "data_root", "val_split", "num_points", "epochs", "samples_per_epoch",
              "batch_size", "lr", "optimizer", "weight_decay")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step"],
                   help="cosine to 0, or step: x0.1 at 60%% and 80%% of the epochs")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=0.0,
                   help="epochs of linear learning-rate warm-up")
    add_flags(p, "device", "seed", "workers", "amp", "cuda_graphs", "out", "resume", "overwrite")
    return p


def main(args):
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: pretraining needs at least one epoch")
    device = resolve_device(args.device)
    _, world, device = distributed.init_distributed(device)
    args.amp = resolve_amp(args.amp, device)
    cuda_graphs_wanted(args.cuda_graphs, device, world)  # a bad combination fails before --out
    heap.keep_freed_memory(device)  # each step's large temporaries reused, not re-faulted
    args.out = out = claim(args.out or os.path.join("checkpoints", f"{args.model}_{args.dataset}"),
                           resume=bool(args.resume), overwrite=args.overwrite)
    resume = None
    if args.resume:  # before the data is loaded: a bad file fails at once
        recorded, model, resume = load_checkpoint(args.resume)
    torch.manual_seed(args.seed)
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adamw" else 0.05)

    train_set = load_split(args.dataset, args.data_root, "train", args.num_points, augment=True,
                           seed=args.seed, val_split=args.val_split,
                           samples_per_epoch=args.samples_per_epoch)
    val_set = load_split(args.dataset, args.data_root, "val", args.num_points, seed=args.seed,
                         val_split=args.val_split)
    train_loader = make_loader(train_set, args.batch_size, train=True, seed=args.seed,
                               workers=args.workers)
    val_loader = make_loader(val_set, args.batch_size, train=False, workers=args.workers)

    if resume is None:
        model = build_model(args.model, **model_kwargs(args.model, train_set))
    model = distributed.wrap_model(model.to(device), device)

    optimizer = build_optimizer(model.parameters(), args.optimizer, lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.schedule, args.epochs, len(train_loader),
                                args.warmup_epochs)

    args.processes = world  # recorded: a resume under another count is refused (lib/cli)
    args.run_id = run_id(recorded.get("args") if resume is not None else None)  # lib/rundir
    train_files = file_listing(train_set)  # a resume compares them (check_resumed_data)
    meta = {"model": {"name": args.model, "kwargs": model_kwargs(args.model, train_set)},
            "dataset": dataset_meta(args.dataset, args.data_root, train_set, args.num_points,
                                    args.seed, val_set, train_files),
            "args": vars(args), "quant": None}
    if resume is not None:
        check_resumed_data(args.resume, recorded.get("dataset", {}), meta["dataset"], resume,
                           len(train_loader), val_set, train_files)
    log = RunLog(out, vars(args))
    if distributed.is_main():
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model}: {n_params:,} parameters; {len(train_set)} train / {len(val_set)} "
              f"val samples; {world} process(es) on {device}; run folder {out}", flush=True)
    best, _ = fit(model, train_loader, val_loader, optimizer, scheduler, supervised_loss, device,
                  args.epochs, out, meta, log, resume=resume, amp=args.amp,
                  cuda_graphs=args.cuda_graphs, seed=args.seed, train_files=train_files)
    if distributed.is_main():
        print(f"best val {best:.4f}; checkpoints in {out}/best.pt and {out}/last.pt")
    log.close()  # last: log.txt copies the console until here
    distributed.cleanup()


if __name__ == "__main__":
    run_script(main, get_args_parser(), kind="pretrain")
