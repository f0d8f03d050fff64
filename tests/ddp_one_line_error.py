"""A bad input that only one process of a torchrun run finds: that rank raises the one-line
ValueError of lib/cli.run_script while the other waits for it in a collective."""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.cli import run_script  # noqa: E402


def main(args):
    dist.init_process_group("gloo")
    if dist.get_rank() == args.failing_rank:
        raise ValueError("data/x.txt: line 3 has 2 columns, expected 7")
    dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--failing-rank", type=int, required=True)
    run_script(main, parser)
