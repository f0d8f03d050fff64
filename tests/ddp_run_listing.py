"""lib.results_table's score_run under torchrun while a stage writes its first best.pt between
the ranks' listings of the run folder: rank 0 lists --folder without --new-stage, which then lands,
and rank 1 lists it with it. Writes the row names rank 0 scored to --out. Used by
test_distributed.py."""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lib.results_table as results_table  # noqa: E402
from lib import distributed  # noqa: E402


def main(args):
    _, _, device = distributed.init_distributed(torch.device("cpu"))
    listing = results_table.run_checkpoints

    def listed_while_a_stage_lands(run):
        if distributed.rank() == 0:
            found = listing(run)
            distributed.barrier()
            return found
        distributed.barrier()
        shutil.copytree(args.new_stage, os.path.join(run, os.path.basename(args.new_stage)))
        return listing(run)

    results_table.run_checkpoints = listed_while_a_stage_lands
    scored = results_table.score_run(args.folder, batch_size=2, device=device)
    if distributed.is_main():
        with open(args.out, "w") as f:
            json.dump([name for name, _ in scored], f)
    distributed.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--folder")
    p.add_argument("--new-stage")
    p.add_argument("--out")
    main(p.parse_args())
