"""The merge_and_eval flow: plan → shards → assemble → evaluate → track.

Each step is a task in ``flows.tasks``; shards run on the runner ``fleet.target`` picks
(``flows/runners/``); all the work happens in ``orchestrator/``.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows import naming, tasks
from flows.artifacts import publish_merge
from flows.outcomes import skipped
from flows.runners import shard_runner
from orchestrator.errors import RecipeError
from orchestrator.evaluate.scores import Evaluation
from orchestrator.pipeline import MergeSummary, held_output
from orchestrator.plan_ref import open_plan
from orchestrator.recipe import Recipe, load_recipe
from orchestrator.tracking.record import OpenRun, TrackedRun, end_abandoned_runs, ended_on_failure, start_merge_run


class MergeAndEvalResult(MergeSummary):
    """A merge the flow ran: the merge's summary, where its shards ran, its scores and its record."""

    target: str
    flow_run_id: str
    evaluation: Evaluation | None
    tracking: TrackedRun | None


class SkippedMerge(BaseModel):
    """A scheduled run that found nothing to do (``skip_unchanged``)."""

    output: str
    skipped: bool = True
    reason: str


def the_recipe(recipe: Recipe | None, recipe_file: str | None) -> Recipe:
    """The recipe a flow run was given: as a recipe (a mapping, for Prefect) or as a file."""
    if (recipe is None) == (recipe_file is None):
        raise RecipeError("give the flow a recipe: either recipe= (the recipe itself) or recipe_file= (its YAML file), not both")
    return recipe if recipe is not None else load_recipe(recipe_file)  # type: ignore[arg-type]


@flow(name="merge-and-eval", flow_run_name=naming.starting_name, description="Merge checkpoints from a recipe, evaluate the merge, record it.")
def merge_and_eval(
    recipe: Recipe | None = None,
    output: str | None = None,
    overwrite: bool = False,
    skip_unchanged: bool = False,
    recipe_file: str | None = None,
) -> MergeAndEvalResult | SkippedMerge:
    """``recipe``: the recipe (a deployment passes it as a mapping); or ``recipe_file``, the
    path of its YAML file where the flow runs.
    ``output``: where the checkpoint goes (default: fleet.output).
    ``overwrite``: replace a different merge already in ``output``.
    ``skip_unchanged``: do nothing when neither the recipe nor any input changed since
    the last successful merge into ``output`` (a nightly schedule)."""
    started_at, started = time.time(), time.perf_counter()
    parsed = the_recipe(recipe, recipe_file)
    out = parsed.output_location(output)

    if skip_unchanged and not tasks.check_unchanged_task(parsed, out):
        reason = f"nothing changed since the last successful merge into {out}"
        # the run ends in this state (Completed, named Skipped); a caller gets its data
        return skipped(SkippedMerge(output=out, reason=reason), reason)  # type: ignore[return-value]

    run = open_mlflow_run(parsed, out, started_at)
    with ended_on_failure(run):
        return merge_evaluate_track(parsed, out, run, overwrite=overwrite, started=started)


def open_mlflow_run(parsed: Recipe, out: str, started_at: float) -> OpenRun:
    """The merge's MLflow run, RUNNING from ``started_at`` (when the flow run began) until the
    track step finishes it, or FAILED with the error's line when any step before fails,
    including a refusal (an output over an input, another merge holding the output's lock, a
    plan refused): a person finds every attempted merge, and why it failed, where the merges
    are. A flow run that fails before this (a recipe file that does not parse; ``mergefleet
    run`` refuses a bad recipe before any flow runs) or skips the merge (``skip_unchanged``)
    has no MLflow run: no merge was attempted."""
    return start_merge_run(parsed, tasks.absolute(out), target=parsed.fleet.target, started_at=started_at)


def merge_evaluate_track(
    parsed: Recipe,
    out: str,
    run: OpenRun,
    *,
    overwrite: bool,
    started: float,
    tags: dict[str, str] | None = None,
) -> MergeAndEvalResult:
    """The steps of one merge inside a flow run: plan, shards, assemble, evaluate, track into
    the MLflow ``run`` opened when the flow began (``open_mlflow_run``; ``tags`` added). The
    caller ends ``run`` if a step fails (``ended_on_failure``). ``started``: when the flow run
    began (a monotonic clock). The output's lock is held until the evaluation has rewritten
    the model card: one merge per output."""
    with held_output(parsed, tasks.absolute(out)):
        end_abandoned_runs(run, tasks.absolute(out))  # with the lock held, a RUNNING run of this output is a dead one's
        plan = tasks.plan_task(parsed, out, overwrite=overwrite)
        opened = open_plan(plan)
        naming.name_merge_run(opened, parsed.fleet.target)
        shards = shard_runner(parsed.fleet).run(plan, range(len(opened.shards)))
        # wait_for and passed results draw the graph as the data goes: shards -> assemble -> evaluate -> track
        manifest = tasks.assemble_task(plan, wait_for=shards)
        summary = MergeSummary.of(opened, shards, manifest, time.perf_counter() - started)
        evaluated = tasks.evaluate_task(plan, parsed.fleet.eval, wait_for=[manifest], return_state=True)
        evaluation = evaluated.result()
    tracking = tasks.track_task(
        plan, manifest, shards, evaluation, summary.seconds, run_id=run.run_id, tags=tags, wait_for=[evaluated]
    )
    publish_merge(opened, shards, evaluation, tracking, seconds=summary.seconds)
    return MergeAndEvalResult(
        **dict(summary), target=parsed.fleet.target, flow_run_id=flow_run.id, evaluation=evaluation, tracking=tracking
    )
