"""The sweep flow: a grid of methods and parameters over the same inputs, side by side in MLflow.

1. evaluate the inputs once (their scores are cached by fingerprint, so every point reuses them);
2. per grid point, in parallel: merge → evaluate → record an MLflow run tagged ``mergefleet.sweep``.

All the work is in ``orchestrator/`` (``sweep.expand_grid``, ``pipeline.merge``,
``evaluate.scores.evaluate_merge``, ``tracking.record.track_merge``); see ``mergefleet
compare`` for the table and chart of the result.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.merge_and_eval import the_recipe
from orchestrator.evaluate.runner import CheckpointScores
from orchestrator.evaluate.scores import Evaluation, evaluate_inputs, evaluate_merge
from orchestrator.pipeline import merge
from orchestrator.plan_ref import open_plan
from orchestrator.recipe import Recipe
from orchestrator.sweep import SweepGrid, SweepPoint, expand_grid, sweep_id
from orchestrator.threads import share_cpu
from orchestrator.tracking.record import TrackedRun, track_merge


class PointResult(BaseModel):
    label: str
    method: str
    parameters: dict[str, Any]
    output: str
    plan_id: str
    seconds: float
    evaluation: Evaluation | None
    tracking: TrackedRun


class SweepResult(BaseModel):
    sweep: str
    points: list[PointResult]


@task(name="evaluate-inputs", cache_policy=NO_CACHE, persist_result=False)
def evaluate_sweep_inputs(recipe: Recipe) -> dict[str, CheckpointScores]:
    """Scores of the base and every expert, computed once for the whole sweep."""
    if recipe.fleet.eval is None or not recipe.fleet.eval.evaluate_inputs:
        return {}
    return evaluate_inputs(recipe.model_refs(), recipe.fleet.eval, storage=recipe.fleet.storage)


@task(name="merge-evaluate-track", task_run_name="{point.label}", cache_policy=NO_CACHE, persist_result=False)
def merge_point(point: SweepPoint, sweep: str, overwrite: bool) -> PointResult:
    recipe = point.recipe
    summary = merge(recipe, recipe.output_location(), workers=1, overwrite=overwrite)
    plan = open_plan(summary.plan_ref)
    evaluation = evaluate_merge(plan, recipe.fleet.eval, storage=plan.storage) if recipe.fleet.eval is not None else None
    tracked = track_merge(
        plan, summary.manifest, None, evaluation, run_name=point.label, tags={"mergefleet.sweep": sweep}, merge_seconds=summary.seconds
    )
    return PointResult(
        label=point.label,
        method=point.method,
        parameters=point.parameters,
        output=summary.output,
        plan_id=summary.plan_id,
        seconds=round(summary.seconds, 3),
        evaluation=evaluation,
        tracking=tracked,
    )


@flow(name="sweep", description="Merge the same inputs with a grid of methods and parameters; evaluate and record each.")
def sweep(
    recipe: Recipe | None = None,
    grid: SweepGrid | None = None,
    output: str | None = None,
    parallel: int = 2,
    overwrite: bool = False,
    recipe_file: str | None = None,
) -> SweepResult:
    """``recipe`` (or ``recipe_file``, its YAML file). ``grid``: ``{"methods": [...],
    "parameters": {"weight": [...], "density": [...]}}`` (default: the recipe as it is).
    ``output``: the directory under which each point writes ``<label>/`` (default:
    fleet.output). ``parallel``: points at once."""
    parsed = the_recipe(recipe, recipe_file)
    grid = grid or SweepGrid()
    points = expand_grid(parsed, grid, output=output)
    tag = sweep_id(parsed, grid)
    evaluate_sweep_inputs(parsed)
    parallel = max(1, min(parallel, len(points)))
    with share_cpu(parallel), ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [runner.submit(merge_point, parameters={"point": p, "sweep": tag, "overwrite": overwrite}) for p in points]
        wait(futures)
    return SweepResult(sweep=tag, points=[future.result() for future in futures])
