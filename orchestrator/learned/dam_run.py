"""``mergefleet dam train RECIPE``: learn the coefficients the recipe's ``dam_apply`` merge reads.

The recipe's ``models`` are the experts (in the order ``dam_apply`` will read them; no
``base_model``), ``fleet.dam`` the training settings and data, ``parameters.coefficients``
where the coefficient file goes. The same recipe then merges with ``mergefleet merge``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.errors import OutputError, RecipeError
from orchestrator.learned.coefficients import split_uri, write_coefficients
from orchestrator.learned.dam import StepLoss, train_dam
from orchestrator.learned.records import expert_labels, record_dam
from orchestrator.learned.settings import DamSettings
from orchestrator.recipe import Recipe
from orchestrator.storage import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DamJob:
    experts: list[str]
    settings: DamSettings
    coefficients: str


def dam_job(recipe: Recipe, *, coefficients: str | None = None, overrides: dict[str, Any] | None = None) -> DamJob:
    """What to train, from the recipe; names the key to set when something is missing."""
    if recipe.fleet.dam is None:
        raise RecipeError("the recipe has no 'fleet: {dam: {data: {MODEL: data.jsonl, ...}}}' section: DAM needs each expert's data")
    if recipe.base_model:
        raise RecipeError("DAM merges the experts themselves: remove base_model (list only the experts under models)")
    if recipe.slices:
        raise RecipeError("DAM takes 'models:', not 'slices:'")
    target = coefficients or recipe.parameters.get("coefficients")
    if not isinstance(target, str):
        raise RecipeError("where do the coefficients go? set 'parameters: {coefficients: PATH.safetensors}' or pass --coefficients")
    split_uri(target)
    settings = recipe.fleet.dam.model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
    return DamJob(experts=[entry.model for entry in recipe.models], settings=DamSettings.model_validate(settings.model_dump()), coefficients=target)


def run_dam_training(
    recipe: Recipe,
    *,
    coefficients: str | None = None,
    overwrite: bool = False,
    track: bool = True,
    overrides: dict[str, Any] | None = None,
    on_step: Callable[[StepLoss], None] | None = None,
) -> dict[str, Any]:
    """Train, write the coefficient file, record the run; returns a summary."""
    job = dam_job(recipe, coefficients=coefficients, overrides=overrides)
    folder, name = split_uri(job.coefficients)
    if not overwrite and ckpt.open_output(folder, storage=recipe.fleet.storage).exists(name):
        raise OutputError(f"{job.coefficients} already exists; pass --overwrite to replace it, or choose another coefficients path")
    result = train_dam(job.experts, job.settings, storage=recipe.fleet.storage, on_step=on_step)
    labels = expert_labels(job.experts)
    extra = {"mergefleet_dam_steps": str(result.steps), "mergefleet_dam_settings": job.settings.model_dump_json()}
    write_coefficients(job.coefficients, result.coefficients, job.experts, extra=extra, overwrite=overwrite, storage=recipe.fleet.storage)
    summary: dict[str, Any] = {
        "coefficients": job.coefficients,
        "experts": job.experts,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "first_loss": result.losses[0].total if result.losses else None,
        "final_loss": result.losses[-1].total if result.losses else None,
        "memory_bytes": result.memory.total,
        "statistics": result.statistics(labels),
        "run_id": None,
    }
    if track:
        record = record_dam(result, settings=job.settings, coefficients_uri=job.coefficients, tracking_uri=recipe.fleet.tracking_uri,
                            experiment=recipe.fleet.experiment, name=recipe.name or f"dam-{name.removesuffix('.safetensors')}", labels=labels)
        summary["run_id"], summary["tracking_uri"] = record.run_id, record.tracking_uri
    return summary
