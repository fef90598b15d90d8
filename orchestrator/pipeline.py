"""The whole merge on one machine: plan, run shards, assemble.

This is what ``mergefleet merge`` runs, with its shards in worker processes
(``orchestrator.runners.processes``). The Prefect flow runs the same three steps with
another shard runner (``flows/runners/``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

from pydantic import BaseModel, Field, field_serializer

from orchestrator.assemble import Manifest, assemble
from orchestrator.memory import return_freed_memory
from orchestrator.output_guard import claim_output, plan_locations, refuse_output_over_inputs
from orchestrator.plan import PLAN_FILE, Plan, build_plan, recut
from orchestrator.plan_ref import PlanRef, remember
from orchestrator.receipt import ShardOutcome
from orchestrator.recipe import Recipe
from orchestrator.runners.base import ShardRunner
from orchestrator.runners.threads import WorkerThreads
from orchestrator.shard import OnTensor
from orchestrator.sizing import Layout, Told, choose_layout, merge_size, probe_machine
from orchestrator.storage.base import OutputSink
from orchestrator.storage.checkpoint import open_output
from orchestrator.storage.output_lock import LockHolder, hold_output_lock

log = logging.getLogger(__name__)


class MergeSummary(BaseModel):
    """What a merge did. ``manifest`` (the checkpoint's ``mergefleet.json``) and ``plan_ref``
    are left out of the summary's JSON, which is what ``mergefleet merge --json`` prints."""

    plan_id: str
    output: str
    method: str
    shards: int
    workers: int | None  # None when the shards ran on another runner (Prefect tasks, pods)
    layout: Layout | None  # how shards and workers were chosen (``mergefleet merge``)
    shards_skipped: int
    shards_redone: list[str] = []  # shards whose receipt existed but whose file did not match it, and why
    tensors: int
    bytes_written: int
    bytes_merged: int  # written by this run (bytes_written less the shards already done)
    seconds: float
    report: dict[str, Any]
    manifest: Manifest = Field(exclude=True)
    plan_ref: PlanRef = Field(exclude=True)  # opens the plan without reading it again (open_plan)

    @field_serializer("seconds", when_used="json")
    def _milliseconds(self, seconds: float) -> float:
        return round(seconds, 3)

    @classmethod
    def of(
        cls, plan: Plan, outcomes: list[ShardOutcome], manifest: Manifest, seconds: float, layout: Layout | None = None
    ) -> "MergeSummary":
        return cls(
            plan_id=plan.plan_id,
            output=plan.output,
            method=plan.method,
            shards=len(plan.shards),
            workers=layout.workers if layout else None,
            layout=layout,
            shards_skipped=sum(1 for outcome in outcomes if outcome.skipped),
            shards_redone=[outcome.redone_because for outcome in outcomes if outcome.redone_because],
            tensors=sum(len(s.tensors) for s in plan.shards),
            bytes_written=sum(outcome.receipt.bytes_written for outcome in outcomes),
            bytes_merged=sum(outcome.receipt.bytes_written for outcome in outcomes if not outcome.skipped),
            seconds=seconds,
            report=manifest.report,
            manifest=manifest,
            plan_ref=PlanRef.of(plan),
        )


@contextlib.contextmanager
def claimed_output(plan: Plan, *, overwrite: bool = False) -> Iterator[OutputSink]:
    """Hold ``plan``'s output for a ``with`` block: refuse an output over an input (before
    anything is written), take the output's lock, claim it (``output_guard.claim_output``:
    same merge resumes, ``overwrite`` deletes only what the previous merge recorded), and
    delete the temp files of dead writers."""
    refuse_output_over_inputs(plan.output, plan_locations(plan))
    sink = plan.output_sink()
    with hold_output_lock(sink):
        claim_output(plan, sink, overwrite=overwrite)
        sink.remove_partials()
        yield sink


@contextlib.contextmanager
def held_output(recipe: Recipe, location: str) -> Iterator[LockHolder]:
    """Hold the output lock of ``recipe``'s merge into ``location`` (absolute) for a ``with``
    block, after refusing an output over an input (before the lock writes anything there):
    what a flow holds from its plan step to its last file, one merge per output."""
    refuse_output_over_inputs(location, recipe.model_refs())
    with hold_output_lock(open_output(location, storage=recipe.fleet.storage)) as holder:
        yield holder


def prepare_output(plan: Plan, *, overwrite: bool = False) -> OutputSink:
    """Claim ``plan``'s output and write its plan (``claimed_output``), then let the lock go:
    what ``mergefleet plan`` does, and the flow's plan step inside the flow's own lock."""
    with claimed_output(plan, overwrite=overwrite) as sink:
        return sink


def merge(
    recipe: Recipe,
    output: str,
    *,
    shards: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_tensor: OnTensor | None = None,
    runner: ShardRunner | None = None,
) -> MergeSummary:
    """Plan, shard and assemble a recipe into ``output``; resumes an interrupted merge.

    Shards run on ``runner``; by default in ``workers`` worker processes on ``device``
    (each defaulting to the recipe's ``fleet`` settings), reporting to ``on_tensor``.
    """
    started = time.perf_counter()
    device = device or recipe.fleet.device
    plan = build_plan(recipe, output, shards=shards, allow_pickle=allow_pickle)
    told_shards = _told(shards, recipe.fleet.shards) or _previous_cut(plan)
    layout = choose_layout(
        probe_machine(), merge_size(plan), shards=told_shards, workers=_told(workers, recipe.fleet.workers), device=device
    )
    plan = recut(plan, layout.shards)
    log.info("%d shard(s) on %s", layout.shards, layout.describe())
    if on_plan:
        on_plan(plan)
    with claimed_output(plan, overwrite=overwrite):
        if runner is None:
            runner = WorkerThreads(workers=layout.workers, device=device, on_tensor=on_tensor)
        try:
            outcomes = runner.run(remember(plan), range(len(plan.shards)))
        finally:
            return_freed_memory()  # what the shards freed (kept for their next tensors)
        for outcome in outcomes:
            if outcome.redone_because:
                log.warning("shard %d was redone: %s", outcome.receipt.index, outcome.redone_because)
        manifest = assemble(plan)
    return MergeSummary.of(plan, outcomes, manifest, time.perf_counter() - started, layout)


def _told(flag: int | None, recipe: int | None) -> Told | None:
    """A count set on the command line (or in Python), else in the recipe's ``fleet:``."""
    if flag is not None:
        return Told(flag, "flags")
    return Told(recipe, "recipe") if recipe is not None else None


def _previous_cut(plan: Plan) -> Told | None:
    """The shard count of the same merge (recipe, inputs, dtype, precision) already in the
    output, so that an interrupted merge resumes under the same plan on whatever machine."""
    sink = plan.output_sink()
    if not sink.exists(PLAN_FILE):
        return None
    try:
        previous = Plan.from_json(sink.read_file(PLAN_FILE))
    except ValueError:  # unreadable: prepare_output says what holds the output
        return None
    same = recut(previous, len(plan.shards)).plan_id == plan.plan_id
    return Told(len(previous.shards), "output") if same else None
