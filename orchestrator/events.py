"""A merge's progress as it happens, for whoever shows it (the command line's live view).

Each step reports a small frozen event on the ``orchestrator.events`` logger, as the
record's ``event`` attribute. The library stays free of any display and of global
state: without a handler on that logger (the default) nothing is built or kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

EVENTS = logging.getLogger("orchestrator.events")


@dataclass(frozen=True)
class ShardSize:
    index: int
    tensors: int
    out_bytes: int


@dataclass(frozen=True)
class PlanReady:
    plan_id: str
    method: str
    output: str
    inputs: int
    shards: tuple[ShardSize, ...]


@dataclass(frozen=True)
class ShardProgress:
    """One more tensor of a shard written: ``tensors`` and ``bytes`` so far."""

    index: int
    tensors: int
    bytes: int


@dataclass(frozen=True)
class ShardDone:
    index: int
    bytes_written: int
    seconds: float
    skipped: bool  # its receipt said it was done already


@dataclass(frozen=True)
class Assembled:
    output: str
    files: int


@dataclass(frozen=True)
class EvaluationStarted:
    """One checkpoint's evaluation starts: ``label`` is merged, base or the expert's name."""

    label: str
    model: str
    position: int
    total: int


@dataclass(frozen=True)
class EvaluationDone:
    label: str
    model: str
    scores: dict[str, float]
    seconds: float
    cached: bool


Event = PlanReady | ShardProgress | ShardDone | Assembled | EvaluationStarted | EvaluationDone


def emit(event: Event) -> None:
    """Report ``event`` to whoever listens on ``orchestrator.events`` (usually nobody)."""
    if EVENTS.isEnabledFor(logging.INFO):
        EVENTS.info("%s", event, extra={"event": event})


def shard_progress(index: int) -> Callable[[str, int], None]:
    """An ``on_tensor`` callback for ``run_shard`` that reports shard ``index``'s progress,
    at most every tenth of a second (and for the last tensor, through ``ShardDone``)."""
    count = 0
    written = 0
    last = 0.0

    def on_tensor(name: str, nbytes: int) -> None:
        nonlocal count, written, last
        count += 1
        written += nbytes
        now = time.monotonic()
        if now - last >= 0.1:
            last = now
            emit(ShardProgress(index, count, written))

    return on_tensor
