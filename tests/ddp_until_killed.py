"""A torchrun worker that joins the process group, writes its pid to PIDS_DIR/<rank>.pid and
then waits (at most a minute): for tests/test_distributed.py's launcher-killed drill."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.distributed import init_distributed  # noqa: E402

if __name__ == "__main__":
    rank, _, _ = init_distributed(torch.device("cpu"))
    folder = sys.argv[1]
    with open(os.path.join(folder, f"{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(folder, f"{rank}.tmp"), os.path.join(folder, f"{rank}.pid"))
    time.sleep(60)
