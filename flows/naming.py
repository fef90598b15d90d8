"""How a merge's runs are named and tagged in the Prefect UI: the flow run
``<recipe name>-<method>-<short plan id>`` tagged with the method, the number of experts and
the target; each shard's task run by its index and layer range."""

from __future__ import annotations

import re
from typing import Any

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from orchestrator.plan import Plan
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.recipe import Recipe
from orchestrator.report import expert_count, shard_name

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def merge_run_name(recipe_name: str | None, method: str, plan_id: str | None = None) -> str:
    """``<recipe name>-<method>-<first 8 of the plan id>``; without a name, the method leads."""
    parts = [_UNSAFE.sub("-", recipe_name).strip("-") if recipe_name else "", method, (plan_id or "")[:8]]
    return "-".join(part for part in parts if part)


def merge_tags(plan: Plan, target: str) -> list[str]:
    """Tags a person filters flow runs by: ``method:ties``, ``experts:3``, ``target:inline``."""
    return [f"method:{plan.method}", f"experts:{expert_count(plan)}", f"target:{target}"]


def starting_name() -> str:
    """The flow run's name before the plan exists (``flow_run_name``): recipe name and method."""
    parameters: dict[str, Any] = flow_run.parameters or {}
    recipe = parameters.get("recipe")
    if isinstance(recipe, Recipe):
        return merge_run_name(recipe.name, recipe.merge_method)
    if isinstance(recipe, dict) and recipe.get("merge_method"):
        return merge_run_name(recipe.get("name"), str(recipe["merge_method"]))
    return "merge-and-eval"


def name_merge_run(plan: Plan, target: str) -> str:
    """Rename the current flow run after its plan and add the merge's tags; returns the name."""
    name = merge_run_name(plan.recipe.get("name"), plan.method, plan.plan_id)
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id)
        tags = list(dict.fromkeys([*current.tags, *merge_tags(plan, target)]))
        client.update_flow_run(flow_run.id, name=name, tags=tags)
    return name


def shard_run_name(parameters: dict[str, Any]) -> str:
    """A shard task run's name (``task_run_name``): ``shard-2 (layers 8-11)``."""
    plan: PlanRef = parameters["plan"]
    return shard_name(open_plan(plan), parameters["index"])
