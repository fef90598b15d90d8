"""One candidate of a search or a mixture: merge it, evaluate it, record it as an MLflow run.

The only module of ``orchestrator.learned`` that calls the merge pipeline, the evaluation
and the lineage: a search trial and a Merge to Mix subset are ordinary merges.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from orchestrator.errors import RecipeError
from orchestrator.evaluate import evaluate_inputs, evaluate_merge
from orchestrator.pipeline import load_plan, merge
from orchestrator.recipe import Recipe
from orchestrator.tracking import track_merge

Objective = Literal["mean", "normalised"]


@dataclass
class CandidateResult:
    label: str
    output: str
    plan_id: str
    score: float  # the objective: mean primary score over the tasks (or mean normalised score)
    scores: dict[str, float]  # task -> primary score
    merge_seconds: float
    eval_seconds: float
    run_id: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # what made this candidate (trial values, subset)
    report: dict[str, Any] = field(default_factory=dict)  # the merge's report (e.g. protected drop rates)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    if not recipe.fleet.output:
        raise RecipeError(f"candidate {label} has no output location")
    started = time.perf_counter()
    summary = merge(recipe, recipe.fleet.output, workers=1, overwrite=overwrite)
    plan = load_plan(summary.output)
    merged_at = time.perf_counter()
    evaluation = evaluate_merge(plan, recipe.fleet.eval)
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
        report=dict(summary.manifest.get("report") or {}),
    )


def evaluate_recipe_inputs(recipe: Recipe) -> None:
    """Score the inputs once (cached by fingerprint) before candidates that reuse them run in parallel."""
    if recipe.fleet.eval is not None and recipe.fleet.eval.evaluate_inputs:
        evaluate_inputs(recipe.model_refs(), recipe.fleet.eval)
