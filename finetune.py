"""Fine-tune a quantized model: apply a searched policy (or a uniform bit width) to an fp32
checkpoint with k-means weight sharing, then train the codebooks with the indices fixed,
optionally distilling from the fp32 model. Checkpoints are written packed.

    python finetune.py --ckpt checkpoints/demo/pretrain/best.pt \
        --policy checkpoints/demo/search/policy.json --keep-first-last 8 --distill --epochs 5
"""
import argparse
import copy
import json
import os

import torch

from lib import distributed
from lib.checkpoint import load_checkpoint, save_checkpoint, unwrap
from lib.cli import common_parser, resolve_device, run_script
from lib.distill import DistillLoss
from lib.experiment import evaluate_checkpoint, example_inputs, load_split, make_loader
from lib.policy_file import parse_keep, read_policy
from lib.quant import keep_first_last, list_quantizable, quantize_model, uniform_policy
from lib.quant.size import budget_ratio, honest_size_bytes
from lib.report import format_results, format_size
from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import build_optimizer, build_scheduler, evaluate, fit, restore_resume_state


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=False, help="fp32 checkpoint to quantize (pretrain.py)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--policy", help="policy.json from search.py")
    which.add_argument("--bits", type=int, help="uniform bit width for every layer")
    p.add_argument("--keep-first-last", default="",
                   help="keep the first layer and the final classifier at BITS or fp32")
    p.add_argument("--method", default="kmeans", choices=["kmeans", "linear"])
    p.add_argument("--distill", action="store_true", help="distil from the fp32 model")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--num-points", type=int, default=None)
    return p


def check_same_keep(policy_path, keep):
    """The first and last layers may only be kept at the width the search kept them at: the
    search charged that width to its budget, and any other would break the budget."""
    with open(policy_path) as f:
        searched = parse_keep(json.load(f).get("keep_first_last"))
    if searched != keep:
        shown = {"off": "not kept", None: "fp32"}
        raise ValueError(f"{policy_path}: searched with the first and last layers "
                         f"{shown.get(searched, f'at {searched} bits')}; fine-tune with the same "
                         f"--keep-first-last (or none), so that the searched budget holds")


def build_quantized(args, model, dataset, device):
    """The fp32 model with the requested policy applied; returns (model, quant metadata)."""
    layers = list_quantizable(model, example_inputs(dataset, device))
    names = [layer.name for layer in layers]
    if args.policy:
        policy = read_policy(args.policy, names)
    elif args.bits:
        policy = uniform_policy(layers, args.bits)
    else:
        raise SystemExit("give --policy policy.json or --bits N")
    keep = parse_keep(args.keep_first_last)
    if keep != "off":
        if args.policy:
            check_same_keep(args.policy, keep)
        policy = keep_first_last(policy, layers, keep)
    quantize_model(model, policy, method=args.method)
    quant = {"bits": policy, "method": args.method, "policy_file": args.policy,
             "keep_first_last": args.keep_first_last or None,
             "fp32_layers": [n for n in names if policy.get(n) in (None, 32)]}
    return model, quant


def main(args):
    device = resolve_device(args.device)
    _, _, device = distributed.init_distributed(device)
    torch.manual_seed(args.seed)
    resume = None
    if args.resume:
        meta, model, resume = load_checkpoint(args.resume)
        if resume is None or meta.get("quant") is None:
            raise SystemExit(f"{args.resume}: not a fine-tuning checkpoint with resume state")
        args.ckpt = meta["quant"]["teacher"]
        args.out = args.out or os.path.dirname(os.path.abspath(args.resume))
    if not args.ckpt:
        raise SystemExit("give --ckpt (an fp32 checkpoint from pretrain.py)")
    fp32_meta, teacher, _ = load_checkpoint(args.ckpt)
    if fp32_meta.get("quant"):
        raise SystemExit(f"{args.ckpt}: already quantized; fine-tune from the fp32 checkpoint")
    data = fp32_meta["dataset"]
    root = args.data_root or data["root"]
    num_points = args.num_points or data["num_points"]
    train_set = load_split(data["name"], root, "train", num_points, augment=True, seed=args.seed,
                           samples_per_epoch=args.samples_per_epoch)
    val_set = load_split(data["name"], root, "val", num_points, seed=args.seed)
    train_loader = make_loader(train_set, args.batch_size, True, args.seed, args.workers)
    val_loader = make_loader(val_set, args.batch_size, False, workers=args.workers)
    teacher.to(device)

    if resume is None:
        model, quant = build_quantized(args, copy.deepcopy(teacher), train_set, device)
        quant["teacher"] = os.path.abspath(args.ckpt)
    else:
        quant = meta["quant"]
    model.to(device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "finetune")
    epochs = args.epochs if args.epochs is not None else 5
    lr = args.lr if args.lr is not None else 1e-4
    model = distributed.wrap_model(model, device)
    optimizer = build_optimizer(model.parameters(), args.optimizer, lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, "cosine", max(epochs, 1), len(train_loader))
    start_epoch, best = (restore_resume_state(resume, optimizer, scheduler)
                         if resume is not None else (0, None))
    loss_fn = (DistillLoss(teacher, data["task"], args.kd_temperature, args.kd_alpha)
               if args.distill else supervised_loss)

    meta = {"model": fp32_meta["model"], "dataset": dict(data, root=root, num_points=num_points),
            "args": vars(args), "quant": quant}
    log = RunLog(out, vars(args))
    if distributed.is_main():
        plain = unwrap(model)
        print(f"quantized {len(quant['bits'])} layers ({args.method}); HAQ budget ratio "
              f"{budget_ratio(plain):.4f}; honest size {honest_size_bytes(plain) / 1024:.1f} KiB",
              flush=True)
    if epochs == 0:
        # No training: the quantized model itself is the result (the "no fine-tune" rows).
        val_metrics = evaluate(model, val_loader, device, args.amp, desc="val")
        if distributed.is_main():
            for name in ("best.pt", "last.pt"):
                save_checkpoint(os.path.join(out, name), unwrap(model),
                                dict(meta, metrics=val_metrics, epoch=0))
        distributed.barrier()  # best.pt is on disk before any rank reads it back
    else:
        fit(model, train_loader, val_loader, optimizer, scheduler, loss_fn, device, epochs, out,
            meta, log, start_epoch, best, args.amp)
    log.close()
    # Score the file as written, through the same path eval.py takes: every rank scores its
    # shard of the test split and all end with the merged figures.
    best_path = os.path.join(out, "best.pt")
    _, results = evaluate_checkpoint(best_path, root, "test", args.batch_size, device,
                                     args.workers)
    if distributed.is_main():
        print(f"{best_path} (test split):")
        print(format_results(data["task"], results))
        with open(os.path.join(out, "best_test.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(format_size(results))
    distributed.cleanup()


if __name__ == "__main__":
    run_script(main, get_args_parser())
