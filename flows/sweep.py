"""The sweep flow: a grid of methods and parameters over the same inputs, side by side in MLflow.

1. evaluate the inputs once (their scores are cached by fingerprint, so every point reuses them);
2. per grid point, in parallel: merge → evaluate → record an MLflow run tagged ``mergefleet.sweep``.

All the work is in ``orchestrator/`` (``sweep.expand_grid``, ``pipeline.merge``,
``evaluate.evaluate_merge``, ``tracking.track_merge``); see ``mergefleet compare`` for
the table and chart of the result.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from orchestrator.evaluate.scores import evaluate_inputs, evaluate_merge
from orchestrator.pipeline import load_plan, merge
from orchestrator.recipe import Recipe, load_recipe, parse_recipe
from orchestrator.sweep import SweepPoint, expand_grid, sweep_id
from orchestrator.tracking.record import track_merge


@task(name="evaluate-inputs", cache_policy=NO_CACHE, persist_result=False)
def evaluate_sweep_inputs(recipe: Recipe) -> dict[str, Any]:
    """Scores of the base and every expert, computed once for the whole sweep."""
    if recipe.fleet.eval is None or not recipe.fleet.eval.evaluate_inputs:
        return {}
    return {ref: scores.model_dump() for ref, scores in evaluate_inputs(recipe.model_refs(), recipe.fleet.eval).items()}


@task(name="merge-evaluate-track", task_run_name="{point.label}", cache_policy=NO_CACHE, persist_result=False)
def merge_point(point: SweepPoint, sweep: str, overwrite: bool) -> dict[str, Any]:
    recipe = point.recipe
    summary = merge(recipe, recipe.fleet.output or "", workers=1, overwrite=overwrite)
    plan = load_plan(summary.output)
    evaluation = evaluate_merge(plan, recipe.fleet.eval) if recipe.fleet.eval is not None else None
    tracked = track_merge(
        plan, summary.manifest, None, evaluation, run_name=point.label, tags={"mergefleet.sweep": sweep}, merge_seconds=summary.seconds
    )
    return {
        "label": point.label,
        "method": point.method,
        "parameters": point.parameters,
        "output": summary.output,
        "plan_id": summary.plan_id,
        "seconds": round(summary.seconds, 3),
        "evaluation": evaluation.model_dump() if evaluation else None,
        "tracking": tracked.as_dict(),
    }


@contextlib.contextmanager
def _share_cpu(parallel: int) -> Iterator[None]:
    """Points merging and evaluating in threads of this process share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@flow(name="sweep", description="Merge the same inputs with a grid of methods and parameters; evaluate and record each.")
def sweep(
    recipe: dict[str, Any] | str,
    grid: dict[str, Any],
    output: str | None = None,
    parallel: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``recipe``: a mapping or the path of a YAML recipe. ``grid``: ``{"methods": [...],
    "parameters": {"weight": [...], "density": [...]}}``. ``output``: the directory under
    which each point writes ``<label>/`` (default: fleet.output). ``parallel``: points at once."""
    parsed = load_recipe(recipe) if isinstance(recipe, str) else parse_recipe(recipe)
    points = expand_grid(parsed, grid, output=output)
    tag = sweep_id(parsed, grid)
    evaluate_sweep_inputs(parsed)
    parallel = max(1, min(parallel, len(points)))
    with _share_cpu(parallel), ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [runner.submit(merge_point, parameters={"point": p, "sweep": tag, "overwrite": overwrite}) for p in points]
        wait(futures)
    results = [future.result() for future in futures]
    return {"sweep": tag, "points": results}
