"""lib/heap.py: after keep_freed_memory, freed large tensors' memory serves the next ones of their
size without page faults (a fresh process each, as the setting lasts for the process)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from lib import heap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rounds of a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB), each written whole,
# as a training step allocates its temporaries again; prints the minor page faults of the last
# five rounds. (glibc 2.36 serves the 64-byte-aligned blocks torch asks for from the freed ones
# only after some rounds, as its memalign asks for more than the block's size.)
ROUNDS = """
import resource, sys, torch
from lib import heap
if sys.argv[1] == "keep":
    assert heap.keep_freed_memory(torch.device("cpu"))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 15:
        before = faults()
    x = torch.empty(16 * 2 ** 20)  # 64 MiB
    x.fill_(1.0)
    del x
print(faults() - before)
"""


def last_rounds_faults(mode):
    env = dict(os.environ, PYTHONPATH=REPO, POINT_HAQ_KEEP_FREED="1")
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=REPO, capture_output=True,
                         text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_faults():
    plain, kept = last_rounds_faults("plain"), last_rounds_faults("keep")
    # 64 MiB is 32 huge pages or 16,384 small ones, all faulted afresh when glibc maps it
    assert plain >= 5 * 32, f"the plain process faulted only {plain} pages: nothing to compare"
    assert kept < 16, f"{kept} page faults in five rounds of tensors freed just before"


def test_other_devices_and_the_opt_out_are_left_alone(monkeypatch):
    assert heap.keep_freed_memory(torch.device("cuda")) is False
    monkeypatch.setenv("POINT_HAQ_KEEP_FREED", "0")
    assert heap.keep_freed_memory(torch.device("cpu")) is False
