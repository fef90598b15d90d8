"""The whole merge on one machine: plan, run shards, assemble.

This is what ``mergefleet merge`` runs, with its shards in worker processes
(``orchestrator.runners.processes``). The Prefect flow runs the same three steps with
another shard runner (``flows/runners/``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pydantic import BaseModel, Field, field_serializer

from orchestrator.assemble import INDEX_FILE, MANIFEST_FILE, Manifest, assemble
from orchestrator.errors import OutputError
from orchestrator.plan import PLAN_FILE, Plan, build_plan, recut
from orchestrator.plan_ref import PlanRef, remember
from orchestrator.receipt import ShardOutcome, receipt_file
from orchestrator.recipe import Recipe
from orchestrator.runners.base import ShardRunner
from orchestrator.runners.processes import WorkerProcesses
from orchestrator.shard import OnTensor
from orchestrator.sizing import Layout, Told, choose_layout, merge_size, probe_machine
from orchestrator.storage.base import OutputSink
from orchestrator.vocabulary import TOKENIZER_FILES

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
    tensors: int
    bytes_written: int
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
            tensors=sum(len(s.tensors) for s in plan.shards),
            bytes_written=sum(outcome.receipt.bytes_written for outcome in outcomes),
            seconds=seconds,
            report=manifest.report,
            manifest=manifest,
            plan_ref=PlanRef.of(plan),
        )


def _owned_files(plan: Plan | None) -> list[str]:
    files = [INDEX_FILE, MANIFEST_FILE, "config.json", PLAN_FILE]
    if plan is not None:
        files += [shard.file for shard in plan.shards] + [receipt_file(s.index) for s in plan.shards]
        files += list(TOKENIZER_FILES)
    return files


def prepare_output(plan: Plan, *, overwrite: bool = False) -> OutputSink:
    """Refuse an output that holds another merge (unless overwriting); then write the plan.

    The same merge (same plan id) again is welcome: its finished shards are kept, and the
    plan file is rewritten when this run's settings differ, so every process that opens
    it sees this run's plan."""
    sink = plan.output_sink()
    previous: Plan | None = None
    if sink.exists(PLAN_FILE):
        try:
            previous = Plan.from_json(sink.read_file(PLAN_FILE))
        except ValueError:  # an unreadable plan (PlanError, or fields that do not validate) is another merge too
            previous = None
        if previous is not None and previous.plan_id == plan.plan_id:
            if previous != plan:  # same merge, other settings (e.g. fleet.storage): the plan on disk is this run's
                sink.write_file(PLAN_FILE, plan.to_json().encode())
            return sink
        if not overwrite:
            what = f"plan {previous.plan_id}, method {previous.method}" if previous else "an unreadable plan"
            raise OutputError(
                f"{plan.output} already holds a different merge ({what}); pass --overwrite to replace it, "
                "or choose another output directory"
            )
    else:
        foreign = [f for f in sink.list_files() if f.endswith(".safetensors") or f in (INDEX_FILE, "config.json")]
        if foreign and not overwrite:
            raise OutputError(
                f"{plan.output} already holds a checkpoint ({foreign[0]}) not written by this merge; "
                "pass --overwrite to replace it, or choose another output directory"
            )
        if overwrite:
            for name in foreign:
                sink.delete(name)
    if overwrite:
        for name in _owned_files(previous):
            if sink.exists(name):
                sink.delete(name)
    sink.write_file(PLAN_FILE, plan.to_json().encode())
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
    prepare_output(plan, overwrite=overwrite).remove_partials()
    if runner is None:
        runner = WorkerProcesses(workers=layout.workers, device=device, on_tensor=on_tensor)
    outcomes = runner.run(remember(plan), range(len(plan.shards)))
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
