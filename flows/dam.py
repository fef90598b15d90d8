"""The DAM flow: learn the coefficients (``orchestrator.learned.dam_run``), then run the
recipe's ``dam_apply`` merge through merge_and_eval like any other merge."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.merge_and_eval import merge_and_eval, the_recipe
from orchestrator.learned.dam_run import run_dam_training
from orchestrator.recipe import Recipe


@task(name="dam-train", task_run_name="dam-train", cache_policy=NO_CACHE, persist_result=False)
def dam_train(recipe: Recipe, overwrite: bool) -> dict[str, Any]:
    return run_dam_training(recipe, overwrite=overwrite)


@flow(name="dam", description="Train DAM coefficients, then merge with them (dam_apply), evaluate and record.")
def dam(
    recipe: Recipe | None = None, output: str | None = None, overwrite: bool = False, recipe_file: str | None = None
) -> dict[str, Any]:
    """``recipe``: a dam_apply recipe with ``fleet.dam`` (see docs/learned.md); or
    ``recipe_file``, the path of its YAML file."""
    parsed = the_recipe(recipe, recipe_file)
    training = dam_train(parsed, overwrite)
    merged = merge_and_eval(parsed, output, overwrite=overwrite)
    return {"training": training, "merge": merged}
