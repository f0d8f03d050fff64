"""Score --ckpt under torchrun while a training run replaces it between the ranks' reads: rank 1's
first read finds --next put in its place (as a run's next best.pt lands), rank 0 read the old
file. Writes the figures rank 0 reports to --out. Used by test_distributed.py."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lib.checkpoint  # noqa: E402
from lib import distributed  # noqa: E402
from lib.experiment import evaluate_checkpoint  # noqa: E402


def main(args):
    _, _, device = distributed.init_distributed(torch.device("cpu"))
    load, reads = lib.checkpoint.load_checkpoint, []

    def load_while_replaced(path):
        if not reads:  # the first read of each rank: rank 0's, then the new file, then rank 1's
            if distributed.rank() == 0:
                reads.append(load(path))
                distributed.barrier()
                return reads[0]
            distributed.barrier()
            os.replace(args.next, path)
        reads.append(None)
        return load(path)

    lib.checkpoint.load_checkpoint = load_while_replaced
    _, results = evaluate_checkpoint(args.ckpt, batch_size=2, device=device)
    if distributed.is_main():
        with open(args.out, "w") as f:
            json.dump(results, f)
    distributed.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--next")
    p.add_argument("--out")
    main(p.parse_args())
