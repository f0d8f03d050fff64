"""Running small-op code on one CPU thread.

Work made of many small ops (the HAQ agent's 300-wide MLPs) only pays synchronisation for
intra-op threads. Measured on this 2-core machine: one DDPG update 2.7 ms on one thread against
430 ms on two; a 255-query torch.searchsorted 100x slower on two. Changing the thread count
costs well under a microsecond, so the big model forwards keep every thread."""
import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """torch on one intra-op thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
