"""Sharing the CPU between work that runs side by side: each of ``parallel`` shards (or
sweep points) gets an equal share of the cores for torch's intra-op threads, so they do
not oversubscribe the machine."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def threads_each(parallel: int) -> int:
    """Torch threads for each of ``parallel`` jobs on this machine (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel))


@contextlib.contextmanager
def share_cpu(parallel: int) -> Iterator[None]:
    """While the block runs, torch in this process uses ``threads_each(parallel)`` threads:
    for ``parallel`` jobs merging or evaluating in threads of one process."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_each(parallel))
    try:
        yield
    finally:
        torch.set_num_threads(before)
