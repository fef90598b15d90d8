"""A merge's scores: the merged checkpoint and, optionally, its base and experts (each
from the score cache when it has them), and the merged scores normalised by theirs, as in
the merging-at-scale study (held-in: merged ÷ the expert that owns the task; held-out:
merged ÷ base)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from orchestrator import events
from orchestrator.errors import EvaluationError
from orchestrator.evaluate.runner import CheckpointScores, evaluate_checkpoint, settings_cache_dir
from orchestrator.evaluate.tasks import resolve_tasks, task_manager
from orchestrator.plan import Plan
from orchestrator.recipe import EvalSettings
from orchestrator.storage.base import StorageOptions


class Evaluation(BaseModel):
    """Scores of a merge, of its inputs (when evaluated) and the normalised scores."""

    tasks: list[str]
    merged: CheckpointScores
    base: CheckpointScores | None = None  # None when the inputs were not evaluated or there is no base
    experts: dict[str, CheckpointScores] = Field(default_factory=dict)  # by the name the recipe gives
    owners: dict[str, str] = Field(default_factory=dict)  # task -> expert name
    normalised: dict[str, float] = Field(default_factory=dict)  # task -> merged ÷ reference


def normalise(
    merged: dict[str, float],
    base: dict[str, float] | None,
    experts: dict[str, dict[str, float]],
    owners: dict[str, str],
) -> dict[str, float]:
    """merged ÷ owner expert for an owned task, merged ÷ base otherwise; a task whose
    reference is missing or scored 0 is left out."""
    result = {}
    for task, score in merged.items():
        owner = owners.get(task)
        reference = experts.get(owner, {}) if owner is not None else (base or {})
        denominator = reference.get(task)
        if denominator:
            result[task] = score / denominator
    return result


def resolve_owners(owners: dict[str, str], experts: list[str], tasks: list[str]) -> dict[str, str]:
    """``fleet.eval.owners`` with every expert as the recipe names it; an owner may also be
    given by its directory name when that is unambiguous."""
    resolved = {}
    for task, owner in owners.items():
        if task not in tasks:
            raise EvaluationError(f"fleet.eval.owners names task '{task}', which is not evaluated; tasks: {', '.join(tasks)}")
        if owner in experts:
            resolved[task] = owner
            continue
        by_name = [e for e in experts if Path(e.rstrip("/")).name == owner]
        if len(by_name) != 1:
            raise EvaluationError(
                f"fleet.eval.owners: '{owner}' (owner of task '{task}') is not one of the merge's experts: "
                + ", ".join(sorted(experts))
            )
        resolved[task] = by_name[0]
    return resolved


def check_evaluation(plan: Plan, settings: EvalSettings) -> None:
    """Refuse, before any merge work, what the evaluation would refuse after it: a task file
    or name lm-eval does not know, an owner that is not one of ``plan``'s experts."""
    tasks = resolve_tasks(settings.tasks, cache_dir=settings_cache_dir(settings))
    task_manager(tasks)
    resolve_owners(settings.owners, [inp.name for i, inp in enumerate(plan.inputs) if i != plan.base], tasks.names)


def evaluate_merge(
    plan: Plan,
    settings: EvalSettings,
    *,
    output: str | None = None,
    storage: StorageOptions | None = None,
) -> Evaluation:
    """Evaluate the merged checkpoint of ``plan`` and, with ``settings.evaluate_inputs``,
    its base and every expert (each cached by fingerprint); return raw and normalised scores.

    ``output`` overrides where the merged checkpoint is (default: ``plan.output``).
    """
    tasks = resolve_tasks(settings.tasks, cache_dir=settings_cache_dir(settings))
    expert_refs = {inp.name: inp.ref for i, inp in enumerate(plan.inputs) if i != plan.base}
    owners = resolve_owners(settings.owners, list(expert_refs), tasks.names)

    checkpoints = [("merged", output or plan.output)]
    if settings.evaluate_inputs:
        checkpoints += [("base", plan.inputs[plan.base].ref)] if plan.base is not None else []
        checkpoints += list(expert_refs.items())
    results = []
    for position, (label, ref) in enumerate(checkpoints):
        events.emit(events.EvaluationStarted(label, ref, position, len(checkpoints)))
        result = evaluate_checkpoint(ref, settings, tasks=tasks, storage=storage)
        events.emit(events.EvaluationDone(label, ref, result.scores, result.seconds, result.cached))
        results.append(result)
    merged, inputs = results[0], results[1:]
    base = inputs.pop(0) if settings.evaluate_inputs and plan.base is not None else None
    experts = dict(zip(expert_refs, inputs))
    normalised = normalise(
        merged.scores,
        base.scores if base else None,
        {name: scores.scores for name, scores in experts.items()},
        owners,
    )
    return Evaluation(tasks=tasks.names, merged=merged, base=base, experts=experts, owners=owners, normalised=normalised)


def evaluate_inputs(refs: list[str], settings: EvalSettings, *, storage: StorageOptions | None = None) -> dict[str, CheckpointScores]:
    """Scores of several checkpoints (a merge's inputs), each from the cache when it has them."""
    tasks = resolve_tasks(settings.tasks, cache_dir=settings_cache_dir(settings))
    return {ref: evaluate_checkpoint(ref, settings, tasks=tasks, storage=storage) for ref in refs}
