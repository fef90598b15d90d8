"""Differential: mergefleet and mergekit 0.1.5 give the same tensors on the same recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests.helpers import gta_recipe, write_recipe

pytestmark = pytest.mark.slow

MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


def mergekit_tensors(recipe: dict[str, Any], tmp_path: Path) -> dict[str, torch.Tensor]:
    path = write_recipe(tmp_path / "mergekit.yaml", recipe)
    out = tmp_path / "mergekit-out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(MERGEKIT), str(path), str(out), "--quiet"], check=True, env=env, capture_output=True, timeout=600)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def mergefleet_tensors(recipe: dict[str, Any], tmp_path: Path, shards: int) -> dict[str, torch.Tensor]:
    out = tmp_path / "mergefleet-out"
    merge(parse_recipe(recipe), str(out), shards=shards)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def recipes(base: Path, experts: list[Path]) -> dict[str, dict[str, Any]]:
    linear = {
        "merge_method": "linear",
        "models": [
            {"model": str(base), "parameters": {"weight": 0.5}},
            {"model": str(experts[0]), "parameters": {"weight": [1.0, 0.2]}},
            {"model": str(experts[1]), "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.7}]}},
        ],
        "dtype": "float32",
    }
    task_arithmetic = gta_recipe("task_arithmetic", base, experts) | {"dtype": "float32", "parameters": {"lambda": 0.8}}
    ties = gta_recipe("ties", base, experts) | {"dtype": "float32"}
    ties["models"][1]["parameters"]["density"] = [{"filter": "self_attn", "value": 0.5}, {"value": 0.25}]
    for recipe in (task_arithmetic, ties):
        recipe.pop("random_seed")
    return {"linear": linear, "task_arithmetic": task_arithmetic, "ties": ties}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_same_tensors_as_mergekit(method: str, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = recipes(base, experts)[method]
    expected = mergekit_tensors(recipe, tmp_path)
    got = mergefleet_tensors(recipe, tmp_path, shards=3)
    assert got.keys() == expected.keys()
    differing = 0
    total = 0
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.float32, name
        close = torch.isclose(got[name], tensor, rtol=0, atol=1e-6)
        differing += int((~close).sum())
        total += tensor.numel()
        if method != "ties":
            assert bool(close.all()), f"{name}: max diff {(got[name] - tensor).abs().max()}"
    assert differing <= total / 10_000, f"{differing} of {total} elements differ"
    changed = sum(int((expected[n] != load_base(base)[n]).sum()) for n in expected)
    assert changed > total / 2, "the merge left the base unchanged: the comparison would prove nothing"


def load_base(base: Path) -> dict[str, torch.Tensor]:
    return load_file(base / "model.safetensors")
