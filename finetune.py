"""Fine-tune a quantized model: apply a searched policy (or a uniform bit width) to an fp32
checkpoint with weight sharing (k-means, or the linear grid a policy was searched with), then
train the codebooks with the indices fixed, optionally distilling from the fp32 model.
Checkpoints are written packed.

    python finetune.py --ckpt checkpoints/demo/pretrain/best.pt \
        --policy checkpoints/demo/search/policy.json --keep-first-last 8 --distill --epochs 5

--epochs 0 quantizes without fine-tuning. The run folder (--out) defaults to the finetune/
subfolder of the checkpoint's folder; the checkpoint's own folder is refused.
"""
import copy
import os

import torch

from lib import distributed, heap
from lib.checkpoint import (atomic_write_json, load_checkpoint, same_input_as_recorded,
                            save_checkpoint, unwrap)
from lib.cli import (add_flags, bit_width, fraction, make_parser, parse_keep, path_arg,
                     positive_float, resolve_amp, resolve_device, run_script)
from lib.cuda_graphs import wanted as cuda_graphs_wanted
from lib.data import file_listing, listing_sha256
from lib.data.val_slice import val_sha256
from lib.distill import DistillLoss
from lib.experiment import (check_resumed_data, check_same_data, evaluate_checkpoint,
                            example_inputs, load_on_every_rank, load_split, make_loader,
                            recorded_data_root, stand_in_inputs)
from lib.policy_file import keep_text, read_on_every_rank
from lib.quant import (called_layers, first_and_last, keep_first_last, list_quantizable,
                       quantize_model, uniform_policy)
from lib.quant.layers import is_fp32, layer_renames, named_quantizable
from lib.quant.size import budget_ratio, honest_size_bytes
from lib.report import format_results, format_size
from lib.rundir import claim, run_id
from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import build_optimizer, build_scheduler, evaluate, fit


def get_args_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", type=path_arg, default=None,
                   help="fp32 checkpoint to quantize (pretrain.py); required for a new run")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--policy", type=path_arg, default=None, help="policy.json from search.py")
    which.add_argument("--bits", type=bit_width, default=None,
                       help="uniform bit width for every layer (32: fp32)")
    add_flags(p, "keep_first_last", "method")
    p.add_argument("--distill", action="store_true", help="distil from the fp32 model")
    p.add_argument("--kd-temperature", type=positive_float, default=2.0,
                   help="distillation temperature T (> 0)")
    p.add_argument("--kd-alpha", type=fraction, default=0.9,
                   help="weight of the distillation term; 1 - alpha for the labels")
    add_flags(p, "data_root", "val_split", "num_points", "epochs", "samples_per_epoch",
              "batch_size", "lr", "optimizer", "weight_decay", "device", "seed", "workers", "amp",
              "cuda_graphs", "out", "resume", "overwrite",
              lr="learning rate of the fine-tune (the codebooks and the fp32 parameters), sgd "
                 "and adamw alike, decayed to 0 by a cosine over the epochs")
    # --method: the policy's own (the one its rewards were measured with), else kmeans
    p.set_defaults(epochs=5, lr=1e-4, weight_decay=0.0, method=None)
    return p


def check_same_keep(policy_file, keep):
    """The first and last layers may only be kept at the width the search kept them at: the
    search charged that width to its budget, and any other would break the budget."""
    searched = policy_file.keep()
    if searched != keep:
        shown = {"off": "not kept", None: "fp32"}
        raise ValueError(f"{policy_file.path}: searched with the first and last layers "
                         f"{shown.get(searched, f'at {searched} bits')}; fine-tune with the same "
                         f"--keep-first-last (or none), so that the searched budget holds")


def sharing_method(policy_file, method):
    """--method for a fine-tune: the policy's (its rewards were measured with that weight
    sharing), which a --method given otherwise may not contradict; kmeans without one."""
    searched = policy_file.method() if policy_file else None
    if method is not None and searched is not None and method != searched:
        raise ValueError(f"{policy_file.path}: searched with --method {searched}; fine-tune "
                         f"with the same (or leave --method out), so that the model is the one "
                         f"its rewards were measured on")
    return method or searched or "kmeans"


def searched_bits(args, policy_file, model, teacher_sha256, data_meta):
    """policy_file's {layer: bits} for `model`, the fp32 model of args.ckpt (SHA-256
    teacher_sha256, its dataset record data_meta), after the checks that need no data: searched
    on this file, with this --keep-first-last (and recording a valid one), no layer the model
    lacks, none it calls left out, and no bad width. main runs them before the splits load,
    which takes minutes on S3DIS."""
    policy_file.check_searched_on(args.ckpt, teacher_sha256)
    keep = parse_keep(args.keep_first_last)
    if keep != "off":
        check_same_keep(policy_file, keep)
    else:
        policy_file.keep()  # build_quantized records it
    names = [name for name, _ in named_quantizable(model)]
    bits = policy_file.bits(names, layer_renames(model))
    if any(name not in bits for name in names):
        # only a layer the forward never calls may be left out (search.py leaves it out): which
        # those are, a forward on made-up points says (build_quantized checks again on the data)
        called = called_layers(list_quantizable(model, stand_in_inputs(data_meta)))
        policy_file.check_listed(bits, [layer.name for layer in called])
    return bits


def build_quantized(args, model, dataset, device, teacher_sha256, policy_file, policy_bits):
    """The fp32 model with the requested policy applied; returns (model, quant metadata).
    teacher_sha256: the SHA-256 of args.ckpt; policy_file: args.policy's PolicyFile and
    policy_bits its searched_bits (None, None: --bits)."""
    layers = list_quantizable(model, example_inputs(dataset, device))
    names = [layer.name for layer in layers]
    policy = policy_bits if policy_file else uniform_policy(layers, args.bits)
    if policy_file:  # needs the forward's calls and order: after the data, unlike searched_bits
        policy_file.check_listed(policy_bits, [layer.name for layer in called_layers(layers)])
        policy_file.check_kept(policy_bits, first_and_last(layers))
    keep = parse_keep(args.keep_first_last)
    if keep != "off":  # a policy's was checked against it (searched_bits)
        policy = keep_first_last(policy, layers, keep)
    elif policy_file:  # the searched bits hold the first and last layers as the search kept them
        keep = policy_file.keep()
    quantize_model(model, policy, method=args.method)
    quant = {"bits": policy, "method": args.method, "policy_file": args.policy,
             "policy_digest": policy_file.digest if policy_file else None,
             "keep_first_last": keep_text(keep),
             "fp32_layers": [n for n in names if is_fp32(policy.get(n))],
             "teacher": os.path.abspath(args.ckpt), "teacher_sha256": teacher_sha256}
    return model, quant


def main(args):
    if not args.ckpt:
        raise ValueError("give --ckpt (an fp32 checkpoint from pretrain.py)")
    if not (args.policy or args.bits or args.resume):
        raise ValueError("give --policy policy.json or --bits N")
    device = resolve_device(args.device)
    _, world, device = distributed.init_distributed(device)
    args.amp = resolve_amp(args.amp, device)
    cuda_graphs_wanted(args.cuda_graphs, device, world)  # a bad combination fails before --out
    heap.keep_freed_memory(device)  # each step's large temporaries reused, not re-faulted
    args.out = out = claim(
        args.out or os.path.join(os.path.dirname(args.ckpt), "finetune"),
        resume=bool(args.resume), overwrite=args.overwrite,
        inputs=[("--ckpt", args.ckpt), ("--policy", None if args.resume else args.policy)])
    torch.manual_seed(args.seed)
    policy_file = None
    if not args.resume and args.policy:  # read once, the same file on every rank
        policy_file = read_on_every_rank(args.policy)
    if not args.resume:  # before the splits load (minutes on S3DIS); recorded with the settings
        args.method = sharing_method(policy_file, args.method)
    resume = None
    if args.resume:
        recorded, model, resume = load_checkpoint(args.resume)
    # every rank quantizes and distils from the same model, whose SHA-256 is the one recorded
    fp32_meta, teacher, _, teacher_sha256 = load_on_every_rank(args.ckpt)
    if args.resume:  # its indices and codebooks came from that model, and --distill learns from it
        same_input_as_recorded(args.ckpt, recorded["quant"].get("teacher_sha256"), "--ckpt",
                               teacher_sha256)
    if fp32_meta.get("quant"):
        raise ValueError(f"{args.ckpt}: already quantized; fine-tune from the fp32 checkpoint")
    policy_bits = (searched_bits(args, policy_file, teacher, teacher_sha256,
                                 fp32_meta["dataset"]) if policy_file else None)
    data = fp32_meta["dataset"]
    root = args.data_root or recorded_data_root(args.ckpt, fp32_meta)
    num_points = args.num_points or data["num_points"]
    train_set = load_split(data["name"], root, "train", num_points, augment=True, seed=args.seed,
                           val_split=args.val_split,
                           samples_per_epoch=args.samples_per_epoch)
    # before any training: the test score at the end (evaluate_checkpoint) refuses such data
    check_same_data(args.ckpt, data, train_set, root)
    val_set = load_split(data["name"], root, "val", num_points, seed=args.seed,
                         val_split=args.val_split)
    train_loader = make_loader(train_set, args.batch_size, True, args.seed, args.workers)
    val_loader = make_loader(val_set, args.batch_size, False, workers=args.workers)
    teacher.to(device)

    if resume is None:
        model, quant = build_quantized(args, copy.deepcopy(teacher), train_set, device,
                                       teacher_sha256, policy_file, policy_bits)
    else:
        quant = recorded["quant"]
    model.to(device)
    epochs = args.epochs
    model = distributed.wrap_model(model, device)
    optimizer = build_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, "cosine", max(epochs, 1), len(train_loader))
    loss_fn = (DistillLoss(teacher, data["task"], args.kd_temperature, args.kd_alpha)
               if args.distill else supervised_loss)

    args.processes = world  # recorded: a resume under another count is refused (lib/cli)
    args.run_id = run_id(recorded.get("args") if resume is not None else None)  # lib/rundir
    train_files = file_listing(train_set)  # a resume compares them (check_resumed_data)
    # this run's own training split, never the teacher's (dict(data) would carry that one)
    meta = {"model": fp32_meta["model"], "dataset": dict(data, root=root, num_points=num_points,
                                                   val_key=train_set.val_key,
                                                   val_source=train_set.val_source,
                                                   val_sha256=val_sha256(val_set),
                                                   train_files_sha256=listing_sha256(train_files),
                                                   seed=args.seed),
            "args": vars(args), "quant": quant}
    if resume is not None:
        check_resumed_data(args.resume, recorded.get("dataset", {}), meta["dataset"], resume,
                           len(train_loader), val_set, train_files)
    log = RunLog(out, vars(args))
    if distributed.is_main():
        plain = unwrap(model)
        quantized = sum(not is_fp32(bits) for bits in quant["bits"].values())
        print(f"quantized {quantized} of {len(quant['bits'])} layers ({args.method}); HAQ "
              f"budget ratio {budget_ratio(plain):.4f}; honest size "
              f"{honest_size_bytes(plain) / 1024:.1f} KiB", flush=True)
    if epochs == 0:
        # No training: the quantized model itself is the result (the "no fine-tune" rows).
        val_metrics = evaluate(model, val_loader, device, args.amp, desc="val")
        if distributed.is_main():
            # last.pt first, as fit writes them: a kill between the two leaves a packed last.pt,
            # which the run scripts start again (lib/stage_status), where a best.pt alone was a
            # result they refuse to delete
            for name in ("last.pt", "best.pt"):
                save_checkpoint(os.path.join(out, name), unwrap(model),
                                dict(meta, metrics=val_metrics, epoch=0))
        distributed.barrier()  # best.pt is on disk before any rank reads it back
    else:
        fit(model, train_loader, val_loader, optimizer, scheduler, loss_fn, device, epochs, out,
            meta, log, resume=resume, amp=args.amp, cuda_graphs=args.cuda_graphs, seed=args.seed,
            train_files=train_files)
    # Score the file as written, through the same path eval.py takes: every rank scores its
    # shard of the test split and all end with the merged figures.
    best_path = os.path.join(out, "best.pt")
    _, results = evaluate_checkpoint(best_path, root, "test", args.batch_size, device,
                                     args.workers, args.amp)
    if distributed.is_main():
        print(f"{best_path} (test split):")
        print(format_results(data["task"], results))
        # written last, atomically: its presence says the run ended (lib/stage_status.py)
        atomic_write_json(os.path.join(out, "best_test.json"), results)
        print(format_size(results))
    log.close()  # last: log.txt copies the console until here
    distributed.cleanup()


if __name__ == "__main__":
    run_script(main, get_args_parser(), kind="finetune")
