"""The steps of the merge_and_eval flow around its shards, each a Prefect task that wraps
one call into ``orchestrator/``: plan, check for changes, assemble, evaluate, track.

Every step after planning receives the plan's ``PlanRef`` and opens the plan with
``open_plan`` (in this process, from memory: the plan step built it here). Shards run on
a shard runner (``flows/runners/``).
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.runners.common import run_log, worth_retrying
from orchestrator import events
from orchestrator.assemble import Manifest, assemble
from orchestrator.evaluate.scores import Evaluation, check_evaluation, evaluate_merge
from orchestrator.memory import return_freed_memory
from orchestrator.model_card import write_card_files
from orchestrator.pipeline import prepare_output
from orchestrator.plan import build_plan
from orchestrator.plan_ref import PlanRef, open_plan, remember
from orchestrator.receipt import ShardOutcome
from orchestrator.recipe import EvalSettings, Recipe
from orchestrator.schedule import changes_since_last_merge
from orchestrator.tracking.record import TrackedRun, track_merge


def absolute(output: str) -> str:
    """A local output as an absolute path, so that workers elsewhere find the same place."""
    return output if "://" in output else os.path.abspath(os.path.expanduser(output))


@task(name="plan", task_run_name="plan", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=worth_retrying)
def plan_task(recipe: Recipe, output: str, *, shards: int | None = None, overwrite: bool = False) -> PlanRef:
    """Build the plan, check the evaluation's tasks and owners, claim the output (writes
    plan.json), clear a killed run's temp files."""
    plan = build_plan(recipe, absolute(output), shards=shards)
    if recipe.fleet.eval is not None:
        check_evaluation(plan, recipe.fleet.eval)
    prepare_output(plan, overwrite=overwrite)  # also deletes dead writers' temp files
    sizes = tuple(events.ShardSize(s.index, len(s.tensors), s.out_bytes) for s in plan.shards)
    events.emit(events.PlanReady(plan.plan_id, plan.method, plan.output, len(plan.inputs), sizes))
    run_log().info("plan %s: %s, %d inputs, %d shard(s) into %s", plan.plan_id, plan.method, len(plan.inputs), len(plan.shards), plan.output)
    return remember(plan)


@task(name="check-inputs", task_run_name="check-inputs", cache_policy=NO_CACHE, persist_result=False)
def check_unchanged_task(recipe: Recipe, output: str) -> list[str]:
    """What changed since the last successful merge into ``output`` (empty: nothing)."""
    changes = changes_since_last_merge(recipe, output)
    if changes:
        run_log().info("merging again: %s", "; ".join(changes))
    else:
        run_log().info("nothing changed since the last successful merge into %s; skipping", output)
    return changes


@task(name="assemble", task_run_name="assemble", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=worth_retrying)
def assemble_task(plan: PlanRef) -> Manifest:
    return_freed_memory()  # what the shards of this process freed (kept for their next tensors)
    opened = open_plan(plan)
    manifest = assemble(opened)
    events.emit(events.Assembled(opened.output, len(manifest.files)))
    run_log().info("assembled %s: %d file(s)", opened.output, len(manifest.files))
    return manifest


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=worth_retrying)
def evaluate_task(plan: PlanRef, settings: EvalSettings | None) -> Evaluation | None:
    """Scores of the merge (and of its inputs); cached by fingerprint, so a re-run reuses them."""
    if settings is None:
        run_log().info("evaluation skipped: no fleet.eval in the recipe")
        return None
    opened = open_plan(plan)
    evaluation = evaluate_merge(opened, settings, storage=plan.storage)
    run_log().info("scores of %s: %s", opened.output, evaluation.merged.scores)
    write_card_files(opened, opened.output_sink(), evaluation)  # the model card gains the scores
    return evaluation


@task(name="track", task_run_name="track", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=worth_retrying)
def track_task(
    plan: PlanRef,
    manifest: Manifest,
    shards: list[ShardOutcome],
    evaluation: Evaluation | None,
    merge_seconds: float,
    *,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> TrackedRun:
    """Record the merge in MLflow run ``run_id`` (opened when the flow began, so that the run
    spans the merge; finished here), else in a new run; with ``tags``, in ``tracking_uri``
    when given; returns where it is."""
    tracked = track_merge(
        open_plan(plan), manifest, shards, evaluation,
        merge_seconds=merge_seconds, run_id=run_id, tags=tags, tracking_uri=tracking_uri,
    )
    run_log().info("recorded as MLflow run %s in %s", tracked.run_id, tracked.tracking_uri)
    return tracked
