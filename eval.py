"""Evaluate any checkpoint, fp32 or quantized, with nothing else given:

    python eval.py --ckpt checkpoints/demo/pretrain/best.pt

Prints the per-category (or per-class) table and the summary table; --json writes the figures.
Under `torchrun --nproc-per-node N eval.py ...` every rank scores its shard of the split (each
sample exactly once) and rank 0 prints the merged figures.
"""
import argparse
import json

from lib import distributed
from lib.cli import resolve_device, run_script
from lib.experiment import evaluate_checkpoint
from lib.report import format_results, format_size


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file (best.pt, last.pt, packed)")
    p.add_argument("--data-root", default=None, help="overrides the data root the checkpoint records")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def main(args):
    _, _, device = distributed.init_distributed(resolve_device(args.device))
    meta, results = evaluate_checkpoint(args.ckpt, args.data_root, args.split, args.batch_size,
                                        device, args.workers)
    main_rank = distributed.is_main()
    distributed.cleanup()
    if not main_rank:
        return
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
