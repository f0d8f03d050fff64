"""Evaluate any checkpoint, fp32 or quantized, with nothing else given:

    python eval.py --ckpt checkpoints/demo/pretrain/best.pt

Prints the per-category (or per-class) table and the summary table; --json writes the figures.
"""
import json

from lib.cli import add_flags, make_parser, path_arg, resolve_device, run_script
from lib.experiment import evaluate_checkpoint
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
    return p


def main(args):
    meta, results = evaluate_checkpoint(args.ckpt, args.data_root, args.split, args.batch_size,
                                        resolve_device(args.device), args.workers, args.amp)
    quant = meta.get("quant")
    print(f"{args.ckpt}: {meta['model']['name']} on {meta['dataset']['name']} ({args.split}), "
          f"{'quantized' if quant else 'fp32'}")
    print(format_results(meta["dataset"]["task"], results))
    print(format_size(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    run_script(main, get_args_parser())
