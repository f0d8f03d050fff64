"""Train a point-cloud model in fp32. Single process on CPU or one GPU, or several GPUs with
`torchrun --nproc-per-node N pretrain.py ...` (DDP).

    python pretrain.py --model pt_seg_tiny --dataset synthetic_parts --epochs 10 --out checkpoints/run
"""
import argparse
import os

import torch

from lib import distributed
from lib.checkpoint import load_checkpoint, unwrap
from lib.cli import common_parser, resolve_device, run_script
from lib.experiment import MODEL_NAMES, dataset_meta, load_split, make_loader, model_kwargs
from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import build_optimizer, build_scheduler, fit, restore_resume_state
from models import build_model


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pt_seg_tiny", choices=MODEL_NAMES)
    p.add_argument("--num-points", type=int, default=None,
                   help="points per sample (default: the dataset's usual number)")
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step"])
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    return p


def main(args):
    device = resolve_device(args.device)
    _, world, device = distributed.init_distributed(device)
    resume = None
    if args.resume:  # before the data is loaded: a bad path fails at once
        recorded, model, resume = load_checkpoint(args.resume)
        if resume is None:
            raise SystemExit(f"{args.resume}: holds no optimizer state to resume from "
                             f"(resume from a last.pt)")
        # The run continues as it was started; only where it runs may change.
        given = args
        args = argparse.Namespace(**recorded["args"])
        args.resume, args.device, args.workers = given.resume, given.device, given.workers
        args.out = args.out or os.path.dirname(os.path.abspath(given.resume))
    torch.manual_seed(args.seed)
    epochs = args.epochs if args.epochs is not None else 20
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adamw" else 0.05)

    # getattr: a run resumed from a checkpoint written before --samples-per-epoch existed
    train_set = load_split(args.dataset, args.data_root, "train", args.num_points, augment=True,
                           seed=args.seed,
                           samples_per_epoch=getattr(args, "samples_per_epoch", None))
    val_set = load_split(args.dataset, args.data_root, "val", args.num_points, seed=args.seed)
    train_loader = make_loader(train_set, args.batch_size, train=True, seed=args.seed,
                               workers=args.workers)
    val_loader = make_loader(val_set, args.batch_size, train=False, workers=args.workers)

    if resume is None:
        model = build_model(args.model, **model_kwargs(args.model, train_set))
    out = args.out or os.path.join("checkpoints", f"{args.model}_{args.dataset}")
    model = distributed.wrap_model(model.to(device), device)

    optimizer = build_optimizer(model.parameters(), args.optimizer, lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.schedule, epochs, len(train_loader),
                                args.warmup_epochs)
    start_epoch, best = (restore_resume_state(resume, optimizer, scheduler)
                         if resume is not None else (0, None))

    meta = {"model": {"name": args.model, "kwargs": model_kwargs(args.model, train_set)},
            "dataset": dataset_meta(args.dataset, args.data_root, train_set, args.num_points),
            "args": vars(args), "quant": None}
    log = RunLog(out, vars(args))
    if distributed.is_main():
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model}: {n_params:,} parameters; {len(train_set)} train / {len(val_set)} "
              f"val samples; {world} process(es) on {device}; run folder {out}", flush=True)
    best, _ = fit(model, train_loader, val_loader, optimizer, scheduler, supervised_loss, device,
                  epochs, out, meta, log, start_epoch, best, args.amp)
    log.close()
    if distributed.is_main():
        print(f"best val {best:.4f}; checkpoints in {out}/best.pt and {out}/last.pt")
    distributed.cleanup()


if __name__ == "__main__":
    run_script(main, get_args_parser())
