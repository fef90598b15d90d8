"""Helpers the tests share: tiny shapes and recipe builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sys

import yaml

from mergefleet.fixtures.synthetic import LlamaShape

MERGEFLEET = [sys.executable, "-m", "mergefleet"]
"""The command line, as the installed package runs it (whatever the console script points at)."""

TINY = LlamaShape(hidden=32, layers=8, intermediate=64, vocab=96, heads=4, kv_heads=2)


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def gta_recipe(method: str, base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    """A recipe for the task-arithmetic family with distinct weights and densities."""
    models: list[dict[str, Any]] = [{"model": str(base)}]
    for i, path in enumerate(experts):
        params: dict[str, Any] = {"weight": [0.3 + 0.2 * i, 0.9 - 0.1 * i]}
        if method not in ("task_arithmetic", "linear"):
            params["density"] = 0.3 + 0.15 * i
        models.append({"model": str(path), "parameters": params})
    recipe = {"merge_method": method, "base_model": str(base), "models": models, "random_seed": 11}
    recipe.update(extra)
    return recipe
