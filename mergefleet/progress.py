"""A rich progress bar for merges: tensors done, bytes written, rate."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from orchestrator.plan import Plan, PlannedShard


class MergeProgress:
    """One bar: tensors done (n of m), bytes written and rate. Silent when disabled."""

    def __init__(self, console: Console, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self._bytes: TaskID | None = None
        self._count = 0
        self._total_tensors = 0

    def __enter__(self) -> "MergeProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._progress.__exit__(kind, error, trace)

    def _start(self, tensors: int, total_bytes: int, label: str) -> None:
        self._bytes = self._progress.add_task(f"{label}: 0/{tensors} tensors", total=total_bytes)
        self._label = label
        self._count = 0
        self._total_tensors = tensors

    def start_plan(self, plan: "Plan") -> None:
        tensors = sum(len(s.tensors) for s in plan.shards)
        self._start(tensors, sum(s.out_bytes for s in plan.shards), f"merging {plan.method}")

    def start_shard(self, shard: "PlannedShard") -> None:
        self._start(len(shard.tensors), shard.out_bytes, f"shard {shard.index}")

    def advance(self, tensor_name: str, nbytes: int) -> None:
        if self._bytes is None:
            return
        self._count += 1
        self._progress.update(
            self._bytes,
            advance=nbytes,
            description=f"{self._label}: {self._count}/{self._total_tensors} tensors",
        )
