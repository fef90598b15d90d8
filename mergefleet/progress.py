"""What a merge shows while it runs: a rich progress bar for ``merge`` and ``shard``
(tensors done, bytes written, rate), and the live view of ``run``'s flow."""

from __future__ import annotations

import logging
import time
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

from orchestrator import events

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


def human_bytes(count: float) -> str:
    """``422.8 KB``: decimal units, as disks and transfer rates are counted."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{task} {value:.3f}" for task, value in scores.items())


class FlowView(logging.Handler):
    """The live view of a merge_and_eval run, fed by ``orchestrator.events``: the plan, each
    shard with its bytes and rate, assembly, and each checkpoint's evaluation. On a terminal
    it is a set of rich progress rows; elsewhere (a pipe, a CI log) one line per finished step.
    """

    def __init__(self, console: Console, *, live: bool, enabled: bool = True) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.enabled = enabled
        self.live = live and enabled
        self._progress = Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(bar_width=16),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not self.live,
        )
        self._rows: dict[str, TaskID] = {}
        self._sizes: dict[int, events.ShardSize] = {}
        self._started: dict[int, float] = {}
        self._propagate = events.EVENTS.propagate
        self._level = events.EVENTS.level

    def __enter__(self) -> "FlowView":
        if self.enabled:
            events.EVENTS.addHandler(self)
            events.EVENTS.setLevel(logging.INFO)
            events.EVENTS.propagate = False  # per-tensor progress stays out of the log
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.enabled:
            events.EVENTS.removeHandler(self)
            events.EVENTS.setLevel(self._level)
            events.EVENTS.propagate = self._propagate
            self._progress.stop()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event is not None:  # logging holds this handler's lock: one event at a time
            self._show(event)

    def _row(self, key: str, description: str, detail: str, *, total: float | None = 1, done: bool = False) -> None:
        if key not in self._rows:
            self._rows[key] = self._progress.add_task(description, total=total, detail=detail)
        task = self._rows[key]
        self._progress.update(task, detail=detail, total=total)
        if done:
            self._progress.update(task, completed=total or 1, total=total or 1)
            self._progress.stop_task(task)
        if done and not self.live:
            self.console.print(f"{description}: {detail}", highlight=False, markup=False)

    def _show(self, event: events.Event) -> None:
        if isinstance(event, events.PlanReady):
            count = len(event.shards)
            self._row("plan", "plan", f"{event.plan_id[:8]} {event.method}, {event.inputs} inputs, {count} shards into {event.output}", done=True)
            for size in event.shards:
                self._sizes[size.index] = size
                self._row(f"shard {size.index}", f"shard {size.index}", f"0/{size.tensors} tensors", total=max(size.out_bytes, 1))
        elif isinstance(event, events.ShardProgress):
            size = self._sizes.get(event.index)
            started = self._started.setdefault(event.index, time.monotonic())
            rate = event.bytes / max(time.monotonic() - started, 1e-3)
            total = f"/{size.tensors}" if size else ""
            key = f"shard {event.index}"
            self._row(key, key, f"{event.tensors}{total} tensors, {human_bytes(event.bytes)}, {human_bytes(rate)}/s", total=max(size.out_bytes, 1) if size else None)
            self._progress.update(self._rows[key], completed=event.bytes)
        elif isinstance(event, events.ShardDone):
            key = f"shard {event.index}"
            size = self._sizes.get(event.index)
            tensors = f"{size.tensors} tensors, " if size else ""
            if event.skipped:
                detail = f"{tensors}{human_bytes(event.bytes_written)}, already done"
            else:
                rate = event.bytes_written / event.seconds if event.seconds else 0.0
                detail = f"{tensors}{human_bytes(event.bytes_written)} in {event.seconds:.1f} s, {human_bytes(rate)}/s"
            self._row(key, key, detail, total=max(event.bytes_written, 1), done=True)
        elif isinstance(event, events.Assembled):
            self._row("assemble", "assemble", f"{event.files} files in {event.output}", done=True)
        elif isinstance(event, events.EvaluationStarted):
            key = f"evaluate {event.label}"
            self._row(key, f"eval {_short(event.label)}", f"{event.position + 1}/{event.total}: lm-eval on {event.model}", total=None)
        elif isinstance(event, events.EvaluationDone):
            key = f"evaluate {event.label}"
            how = "cached" if event.cached else f"{event.seconds:.1f} s"
            self._row(key, f"eval {_short(event.label)}", f"{_scores(event.scores)} ({how})", done=True)
