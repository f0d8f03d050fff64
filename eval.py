"""Evaluate any checkpoint, fp32 or quantized, with nothing else given:

    python eval.py --ckpt checkpoints/demo/pretrain/best.pt

Prints a header line, the summary table, the per-category (or per-class) table and the model's
size; --json writes the metrics.
--save-pred DIR writes each shape's / room's points with label and prediction (PLY);
--render N draws N of them, ground truth beside prediction, and the per-class and confusion charts.
Under `torchrun --nproc-per-node N eval.py ...` every rank scores its shard of the split (each
sample exactly once) and rank 0 prints the merged figures.
"""
import json
import os

from lib import distributed, heap
from lib.cli import add_flags, make_parser, nonneg_int, path_arg, resolve_device, run_script
from lib.experiment import evaluate_checkpoint
from lib.predictions import PredictionSink
from lib.quant.layers import is_fp32
from lib.report import format_results, format_size


def get_args_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", type=path_arg, required=True,
                   help="checkpoint file (best.pt, last.pt, fp32 or packed)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the split to score")
    p.add_argument("--json", type=path_arg, default=None,
                   help="also write the figures to this JSON file")
    add_flags(p, "data_root", "batch_size", "device", "workers", "amp")
    add_prediction_flags(p)
    return p


def render_folder(args):
    return args.render_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                           f"render_{args.split}")


def check_outputs(args):
    """Where the results go, checked before the split is scored (which on S3DIS takes long):
    a one-line error instead of a stack trace, or one after the whole evaluation."""
    for flag, folder in (("--save-pred", args.save_pred),
                         ("--render-dir", render_folder(args) if args.render else None)):
        if folder:
            above = os.path.abspath(folder)
            while not os.path.exists(above):  # the nearest part of the path that exists
                above = os.path.dirname(above)
            if not os.path.isdir(above):
                raise ValueError(f"{flag} {folder}: {above} is a file, not a folder")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            raise ValueError(f"--json {args.json}: a folder, not a file")
        if not os.path.isdir(parent):
            raise ValueError(f"--json {args.json}: no folder {parent} to write it in")


def add_prediction_flags(p):
    """What to keep of the predictions (lib/predictions.py, lib/render.py)."""
    g = p.add_argument_group("predictions")
    g.add_argument("--save-pred", metavar="DIR", type=path_arg, default=None,
                   help="write one PLY per shape / room (x y z, colour of the prediction, integer "
                        "fields label and pred; S3DIS rooms at full resolution, voted) with "
                        "predictions.csv and README.txt into DIR")
    g.add_argument("--render", metavar="N", type=nonneg_int, default=0,
                   help="PNG figures of the first N shapes / rooms (ground truth beside "
                        "prediction), plus per_class_iou.png and confusion.png")
    g.add_argument("--render-dir", metavar="DIR", type=path_arg, default=None,
                   help="where --render writes; None: <checkpoint folder>/render_<split>")


def precision(quant):
    """The checkpoint's weights in a word or two: a fine-tune that kept every layer fp32 (--bits
    32, or a policy of fp32 widths) records a quantization but quantized nothing."""
    if not quant:
        return "fp32"
    widths = quant.get("bits") or {}
    quantized = sum(not is_fp32(bits) for bits in widths.values())
    return "quantized" if quantized or not widths else "fp32 (no layer quantized)"


def main(args):
    check_outputs(args)
    _, _, device = distributed.init_distributed(resolve_device(args.device))
    heap.keep_freed_memory(device)  # each batch's large temporaries reused, not re-faulted
    sink = None
    if args.save_pred or args.render:
        # Titles name the checkpoint as the user would type it: relative to here when inside it
        # (args.ckpt is absolute so that the run folders record absolute paths).
        shown = os.path.relpath(args.ckpt)
        sink = PredictionSink(args.save_pred, keep=args.render,
                              source=args.ckpt if shown.startswith("..") else shown)
    meta, results = evaluate_checkpoint(args.ckpt, args.data_root, args.split, args.batch_size,
                                        device, args.workers, args.amp, sink=sink)
    main_rank = distributed.is_main()
    distributed.cleanup()
    if not main_rank:
        return
    print(f"{args.ckpt}: {meta['model']['name']} on {meta['dataset']['name']} ({args.split}), "
          f"{precision(meta.get('quant'))}")
    print(format_results(meta["dataset"]["task"], results))
    print(format_size(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if sink is not None:
        sink.finish(args.split)
        if args.save_pred:
            print(f"predictions: {len(sink.rows)} files in {args.save_pred}")
    if args.render:
        folder = render_folder(args)
        written = sink.save_figures(folder, results)
        print(f"figures: {len(written)} PNG files in {folder}")


if __name__ == "__main__":
    run_script(main, get_args_parser())
