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

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from orchestrator.errors import RecipeError
from orchestrator.methods import get_method
from orchestrator.recipe import Recipe, parse_recipe


@dataclass
class SweepPoint:
    label: str  # e.g. ties-weight1.0-density0.3; also the run's name and the output's last part
    method: str
    parameters: dict[str, Any]
    recipe: Recipe


def _label(method: str, parameters: dict[str, Any]) -> str:
    return "-".join([method] + [f"{key}{value}" for key, value in parameters.items()])


def expand_grid(recipe: Recipe, grid: dict[str, Any], *, output: str | None = None) -> list[SweepPoint]:
    """One recipe per grid point, each writing to ``<output>/<label>``."""
    unknown = sorted(set(grid) - {"methods", "parameters"})
    if unknown:
        raise RecipeError(f"sweep grid: unknown key(s) {', '.join(unknown)}; allowed: methods, parameters")
    methods = list(grid.get("methods") or [recipe.merge_method])
    parameters: dict[str, list[Any]] = {
        key: (list(values) if isinstance(values, (list, tuple)) else [values]) for key, values in (grid.get("parameters") or {}).items()
    }
    root = output or recipe.fleet.output
    if not root:
        raise RecipeError("sweep: no output location; give output= or set 'fleet: {output: PATH}' in the recipe")
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


def sweep_id(recipe: Recipe, grid: dict[str, Any]) -> str:
    """A short id of the recipe and grid, for the runs' ``mergefleet.sweep`` tag."""
    identity = json.dumps([recipe.recipe_hash(), grid], sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]
