"""One candidate of a search or a mixture: merge it, evaluate it, record it as an MLflow run.

The only module of ``orchestrator.learned`` that calls the merge pipeline, the evaluation
and the lineage: a search trial and a Merge to Mix subset are ordinary merges.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel

from orchestrator.errors import RecipeError
from orchestrator.evaluate.scores import evaluate_inputs, evaluate_merge
from orchestrator.pipeline import merge
from orchestrator.plan_ref import open_plan
from orchestrator.recipe import Recipe
from orchestrator.tracking.record import track_merge

Objective = Literal["mean", "normalised"]


class CandidateResult(BaseModel):
    """One candidate merged, evaluated and (usually) recorded; a Prefect task's result."""

    label: str
    output: str
    plan_id: str
    score: float  # the objective: mean primary score over the tasks (or mean normalised score)
    scores: dict[str, float]  # task -> primary score
    merge_seconds: float
    eval_seconds: float
    run_id: str | None = None
    values: dict[str, Any] = {}  # what made this candidate (trial values, subset)
    report: dict[str, Any] = {}  # the merge's report (e.g. protected drop rates)


def objective_value(scores: dict[str, float], normalised: dict[str, float], objective: Objective) -> float:
    chosen = normalised if objective == "normalised" else scores
    if not chosen:
        raise RecipeError(f"objective '{objective}': the evaluation gave no {'normalised ' if objective == 'normalised' else ''}scores")
    return sum(chosen.values()) / len(chosen)


def merge_evaluate_record(
    recipe: Recipe,
    *,
    label: str,
    tags: dict[str, str] | None = None,
    objective: Objective = "mean",
    record: bool = True,
    values: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> CandidateResult:
    """Merge ``recipe`` into its ``fleet.output`` (``overwrite``: replacing another merge
    there), evaluate it with ``fleet.eval``, and record it (an MLflow run named ``label``)."""
    if recipe.fleet.eval is None:
        raise RecipeError("a search needs evaluation tasks: set 'fleet: {eval: {tasks: [...]}}' in the recipe")
    started = time.perf_counter()
    summary = merge(recipe, recipe.output_location(), workers=1, overwrite=overwrite)
    plan = open_plan(summary.plan_ref)
    merged_at = time.perf_counter()
    evaluation = evaluate_merge(plan, recipe.fleet.eval, storage=plan.storage)
    eval_seconds = time.perf_counter() - merged_at
    run_id = None
    if record:
        tracked = track_merge(plan, summary.manifest, None, evaluation, run_name=label, tags=tags, merge_seconds=summary.seconds)
        run_id = tracked.run_id
    return CandidateResult(
        label=label,
        output=summary.output,
        plan_id=summary.plan_id,
        score=objective_value(evaluation.merged.scores, evaluation.normalised, objective),
        scores=dict(evaluation.merged.scores),
        merge_seconds=round(merged_at - started, 3),
        eval_seconds=round(eval_seconds, 3),
        run_id=run_id,
        values=dict(values or {}),
        report=dict(summary.manifest.report),
    )


def evaluate_recipe_inputs(recipe: Recipe) -> None:
    """Score the inputs once (cached by fingerprint) before candidates that reuse them run in parallel."""
    if recipe.fleet.eval is not None and recipe.fleet.eval.evaluate_inputs:
        evaluate_inputs(recipe.model_refs(), recipe.fleet.eval, storage=recipe.fleet.storage)
