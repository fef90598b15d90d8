"""A sweep: one recipe, a grid of methods and parameters, a merge per grid point.

Every point merges the same inputs, so their evaluations are computed once and cached
(``orchestrator/evaluate/``), and every merge is an MLflow run in the same experiment,
tagged ``mergefleet.sweep``, side by side in the MLflow UI and in ``mergefleet compare``.

The grid::

    {"methods": ["ties", "task_arithmetic"],          # default: the recipe's method
     "parameters": {"weight": [0.5, 1.0], "density": [0.3, 0.6]}}

A parameter is set on every expert (every model but the base); a method that does not
take it (``density`` for ``task_arithmetic``) ignores it, and points that differ only in
ignored parameters are merged once.
"""

from __future__ import annotations

import itertools
import json
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import RecipeError
from orchestrator.hashing import stable_hash
from orchestrator.methods import get_method
from orchestrator.recipe import Recipe, Scalar, parse_recipe


class SweepGrid(BaseModel):
    """The grid: methods (default: the recipe's) and values per parameter (a list, or one value)."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(default_factory=list)
    parameters: dict[str, list[Scalar] | Scalar] = Field(default_factory=dict)


class SweepPoint(BaseModel):
    label: str  # e.g. ties-weight1.0-density0.3; also the run's name and the output's last part
    method: str
    parameters: dict[str, Any]
    recipe: Recipe


def _label(method: str, parameters: dict[str, Any]) -> str:
    return "-".join([method] + [f"{key}{value}" for key, value in parameters.items()])


def expand_grid(recipe: Recipe, grid: SweepGrid, *, output: str | None = None) -> list[SweepPoint]:
    """One recipe per grid point, each writing to ``<output>/<label>``."""
    methods = list(grid.methods or [recipe.merge_method])
    parameters: dict[str, list[Any]] = {
        key: (list(values) if isinstance(values, list) else [values]) for key, values in grid.parameters.items()
    }
    root = recipe.output_location(output)
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    base = recipe.base_model
    points: list[SweepPoint] = []
    seen: set[str] = set()
    for method in methods:
        spec = get_method(method)
        accepted = {p.name for p in spec.model_params} | {p.name for p in spec.global_params}
        global_names = {p.name for p in spec.global_params}
        names = [key for key in parameters if key in accepted]  # none: one point with the recipe's own values
        for values in itertools.product(*(parameters[key] for key in names)):
            chosen = dict(zip(names, values))
            label = _label(method, chosen)
            if label in seen:
                continue
            seen.add(label)
            variant = json.loads(json.dumps(data))
            variant["merge_method"] = method
            for entry in variant.get("models", []):
                if entry["model"] == base:
                    continue
                params = {k: v for k, v in (entry.get("parameters") or {}).items() if k in accepted}
                params.update({k: v for k, v in chosen.items() if k not in global_names})
                entry["parameters"] = params
            globals_ = {k: v for k, v in (variant.get("parameters") or {}).items() if k in accepted}
            globals_.update({k: v for k, v in chosen.items() if k in global_names})
            variant["parameters"] = globals_
            variant["name"] = label
            variant.setdefault("fleet", {})["output"] = str(PurePosixPath(root) / label) if "://" not in root else f"{root.rstrip('/')}/{label}"
            points.append(SweepPoint(label=label, method=method, parameters=chosen, recipe=parse_recipe(variant, source=f"sweep point {label}")))
    if not points:
        raise RecipeError("sweep grid is empty: give at least one method")
    return points


def sweep_id(recipe: Recipe, grid: SweepGrid) -> str:
    """A short id of the recipe and grid, for the runs' ``mergefleet.sweep`` tag."""
    return stable_hash([recipe.recipe_hash(), grid.model_dump(exclude_unset=True)], length=12)
