"""How many shards and workers ``mergefleet merge`` uses when neither the command line nor
the recipe says: one shard per usable core, fewer when memory is short or when the merge is
too small to gain from splitting.

``choose_layout`` is a pure function of the machine's cores and memory and the merge's size,
so the rule can be tested without the machine; ``probe_machine`` reads the machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.explain import tensor_peak_bytes
from orchestrator.methods import get_method
from orchestrator.plan import Plan
from orchestrator.streaming import StreamingPolicy

log = logging.getLogger(__name__)

WORKER_BASE_BYTES = 512 << 20
"""Memory of a worker process before it holds any tensor (interpreter, torch, the plan)."""

MEMORY_SHARE = 0.75
"""Fraction of the available memory the workers may plan to use together."""

MIN_READ_PER_WORKER = {"select": 500_000_000, "plain": 600_000_000}
"""Input bytes each worker must get before the merge is split further. Set when workers were
processes that spent 1–2.5 s starting (interpreter and torch); threads start at once, so the
figures are cautious: a tiny merge stays one shard, one file. Methods that select top-k
entries or sample ("select") spend about twice as long per byte as weighted sums ("plain")."""

ChosenBy = Literal["flags", "recipe", "output", "machine"]


@dataclass(frozen=True)
class Machine:
    """What this machine offers a merge: cores this process may run on, memory available now."""

    cores: int
    available_bytes: int


@dataclass(frozen=True)
class MergeSize:
    """What a merge asks of a machine: the bytes it reads, one worker's expected peak memory
    (its largest tensor with the next one read ahead), whether its method selects or samples,
    and the most shards it can be cut into (one per tensor)."""

    bytes_read: int
    peak_bytes: int
    selects: bool
    max_shards: int


@dataclass(frozen=True)
class Told:
    """A shard or worker count someone set, and where: flags, the recipe's ``fleet:``, or
    (shards only) the plan of the same merge already in the output, which a resume keeps."""

    count: int
    by: ChosenBy


class Layout(BaseModel):
    """The shards a merge is cut into and how many run at once, with who chose each and,
    for the machine's choice, from what."""

    model_config = ConfigDict(frozen=True)

    shards: int
    workers: int
    shards_from: ChosenBy
    workers_from: ChosenBy
    cores: int
    available_bytes: int
    limited_by: str  # what bounds the machine's count of workers: cores, memory, size, tensors or device

    def describe(self) -> str:
        """One clause for the CLI: the workers and who chose them."""
        workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        if self.workers_from != "machine":
            return f"{workers} (from {self.workers_from})"
        return (
            f"{workers} (chosen for {self.cores} cores and {self.available_bytes / 1e9:.1f} GB available; "
            f"limited by {self.limited_by})"
        )


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of memory available to new work (psutil, else /proc/meminfo's MemAvailable), or None."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        log.debug("cannot read %s", meminfo, exc_info=True)
    return None


def probe_machine() -> Machine:
    """This machine now. Unknown memory counts as enough for one worker per core."""
    cores = usable_cores()
    memory = available_memory()
    return Machine(cores=cores, available_bytes=memory if memory is not None else cores * (8 << 30))


def machine_workers(machine: Machine, size: MergeSize, device: str = "cpu") -> tuple[int, str]:
    """The workers the machine and the merge's size allow, and what limits them.

    One per core; at most as many as fit in MEMORY_SHARE of the available memory at
    WORKER_BASE_BYTES plus the merge's peak each; at most one per MIN_READ_PER_WORKER of
    input, since a small merge finishes in one process before a second one has started; one
    on a GPU (the workers would share it)."""
    if device != "cpu":
        return 1, "device"
    by_memory = int(machine.available_bytes * MEMORY_SHARE) // (WORKER_BASE_BYTES + max(0, size.peak_bytes))
    by_size = size.bytes_read // MIN_READ_PER_WORKER["select" if size.selects else "plain"]
    limits = {"cores": machine.cores, "memory": by_memory, "size": by_size, "tensors": size.max_shards}
    limited_by = min(limits, key=lambda name: limits[name])
    return max(1, limits[limited_by]), limited_by


def choose_layout(
    machine: Machine, size: MergeSize, *, shards: Told | None = None, workers: Told | None = None, device: str = "cpu"
) -> Layout:
    """Shards and workers: as told; what is not told, from the machine (``machine_workers``).
    Told workers alone get one shard each; told shards alone run on as many workers as the
    machine allows, at most one per shard."""
    allowed, limited_by = machine_workers(machine, size, device)
    if shards is not None:
        shard_count, shards_from = shards.count, shards.by
    elif workers is not None:
        shard_count, shards_from = min(workers.count, size.max_shards), workers.by
    else:
        shard_count, shards_from = allowed, "machine"
    if workers is not None:
        worker_count, workers_from = workers.count, workers.by
    else:
        worker_count, workers_from = min(allowed, shard_count), "machine"
    return Layout(
        shards=shard_count,
        workers=worker_count,
        shards_from=shards_from,
        workers_from=workers_from,
        cores=machine.cores,
        available_bytes=machine.available_bytes,
        limited_by=limited_by,
    )


def merge_size(plan: Plan, streaming: StreamingPolicy = StreamingPolicy()) -> MergeSize:
    """The size of ``plan``'s merge, whatever its current cut into shards."""
    method = get_method(plan.method)
    tensors = [tensor for shard in plan.shards for tensor in shard.tensors]
    peak = max(
        (tensor_peak_bytes(t, tensors[i + 1] if i + 1 < len(tensors) else None, method, streaming) for i, t in enumerate(tensors)),
        default=0,
    )
    return MergeSize(
        bytes_read=sum(t.in_bytes for t in tensors),
        peak_bytes=peak,
        selects=method.sparsifies or method.uses_randomness,
        max_shards=max(1, len(tensors)),
    )
