"""Differential: the methods beyond the task-arithmetic core against mergekit 0.1.5.

Tiny random Llama checkpoints in float32 (a base and eight experts), recipes with
gradients and filters, 2, 3 and 8 experts where the method allows it. mergekit runs once
for all recipes, in one process (its start-up is most of its cost here), through the same
``MergeConfiguration`` / ``run_merge`` path ``mergekit-yaml`` takes (tests/mergekit_runner.py);
our side runs through
``pipeline.merge`` with three shards. Tensors must agree within 1e-6 (top-k based
methods: at most one element in 10⁴ may differ). karcher checks the difference
docs/methods.md documents: mergekit ignores ``weight``, we honour it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mergefleet.fixtures.synthetic import fine_tuned, random_weights, save_checkpoint
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests.helpers import TINY
from tests.mergekit_runner import load_tensors, run_mergekit

pytestmark = pytest.mark.slow

TOP_K_METHODS = ("breadcrumbs", "breadcrumbs_ties", "sce")

@pytest.fixture(scope="session")
def family8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("family8")
    weights = random_weights(TINY, seed=17, dtype=torch.float32)
    base = save_checkpoint(root / "base", weights, TINY)
    experts = [save_checkpoint(root / f"expert{i + 1}", fine_tuned(weights, seed=300 + i), TINY) for i in range(8)]
    return base, experts


def _models(paths: list[Path], params: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [{"model": str(p), **({"parameters": q} if q else {})} for p, q in zip(paths, params)]


def _weights(count: int) -> list[dict[str, Any]]:
    """Distinct per-model weights: gradients, a filter list, plain numbers."""
    out: list[dict[str, Any]] = []
    for i in range(count):
        if i % 3 == 0:
            out.append({"weight": [0.4 + 0.1 * i, 1.0 - 0.05 * i]})
        elif i % 3 == 1:
            out.append({"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.3 + 0.05 * i}]})
        else:
            out.append({"weight": 0.5 + 0.1 * i})
    return out


def build_recipes(base: Path, experts: list[Path]) -> dict[str, dict[str, Any]]:
    recipes: dict[str, dict[str, Any]] = {}
    common = {"dtype": "float32"}
    for n in (2, 3, 8):
        chosen = experts[:n]
        weights = _weights(n)
        for method in ("breadcrumbs", "breadcrumbs_ties"):
            params = []
            for i, w in enumerate(weights):
                p = dict(w, density=[0.3 + 0.05 * (i % 4), 0.6])
                if i % 2 == 0:
                    p["gamma"] = [{"filter": "self_attn", "value": 0.05}, {"value": 0.02}]
                params.append(p)
            recipes[f"{method}-{n}"] = {
                "merge_method": method,
                "base_model": str(base),
                "models": _models([base, *chosen], [None, *params]),
                "parameters": {"lambda": [1.0, 0.8]} if method == "breadcrumbs" else {"normalize": True},
                **common,
            }
        recipes[f"multislerp-{n}"] = {
            "merge_method": "multislerp",
            "models": _models(chosen, weights),
            **common,
        }
        recipes[f"karcher-{n}"] = {
            "merge_method": "karcher",
            "models": _models(chosen, [None] * n),
            "parameters": {"max_iter": [{"filter": "mlp", "value": 4}, {"value": 10}]},
            **common,
        }
        recipes[f"model_stock-{n}"] = {
            "merge_method": "model_stock",
            "base_model": str(base),
            "models": _models([base, *chosen], [None] * (n + 1)),
            "parameters": {"filter_wise": [{"filter": "self_attn", "value": True}, {"value": False}]},
            **common,
        }
        recipes[f"sce-{n}"] = {
            "merge_method": "sce",
            "base_model": str(base),
            "models": _models([base, *chosen], [None] * (n + 1)),
            "parameters": {"select_topk": [0.3, 0.7]},
            **common,
        }
    recipes["multislerp-base-3"] = {
        "merge_method": "multislerp",
        "base_model": str(base),
        "models": _models([base, *experts[:3]], [None, *_weights(3)]),
        "parameters": {"normalize_weights": False},
        **common,
    }
    recipes["slerp"] = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": _models([base, experts[0]], [None, None]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": [0.3, 0.7]}]},
        **common,
    }
    recipes["nuslerp"] = {
        "merge_method": "nuslerp",
        "models": _models(experts[:2], [{"weight": [0.2, 0.9]}, {"weight": 0.6}]),
        "parameters": {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}]},
        **common,
    }
    recipes["nuslerp-base"] = {
        "merge_method": "nuslerp",
        "base_model": str(base),
        "models": _models([base, *experts[1:3]], [None, {"weight": 1.0}, {"weight": [0.5, 2.0]}]),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": [{"filter": "self_attn", "value": True}, {"value": False}]},
        **common,
    }
    recipes["passthrough"] = {
        "merge_method": "passthrough",
        "models": _models([experts[4]], [{"scale": [{"filter": "norm", "value": 1.5}, {"value": 0.75}]}]),
        **common,
    }
    return recipes


@pytest.fixture(scope="session")
def mergekit_outputs(family8, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every recipe merged by mergekit 0.1.5, in one process: name → tensors (or the error)."""
    base, experts = family8
    return run_mergekit(build_recipes(base, experts), tmp_path_factory.mktemp("mergekit-methods"))


def _ours(recipe: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    merge(parse_recipe(recipe), str(out), shards=3)
    return load_tensors(out)


def _compare(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, top_k: bool) -> None:
    assert got.keys() == expected.keys()
    differing = total = 0
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.float32, name
        close = torch.isclose(got[name], tensor, rtol=0, atol=1e-6)
        differing += int((~close).sum())
        total += tensor.numel()
        if not top_k:
            assert bool(close.all()), f"{name}: max diff {float((got[name] - tensor).abs().max())}"
    assert differing <= total / 10_000, f"{differing} of {total} elements differ"


def _cases() -> list[str]:
    names = []
    for n in (2, 3, 8):
        names += [f"{m}-{n}" for m in ("breadcrumbs", "breadcrumbs_ties", "multislerp", "karcher", "model_stock", "sce")]
    return names + ["multislerp-base-3", "slerp", "nuslerp", "nuslerp-base", "passthrough"]


@pytest.mark.parametrize("case", _cases())
def test_same_tensors_as_mergekit(case: str, family8, mergekit_outputs, tmp_path: Path) -> None:
    base, experts = family8
    expected = mergekit_outputs[case]
    assert isinstance(expected, dict), f"mergekit failed on {case}: {expected}"
    got = _ours(build_recipes(base, experts)[case], tmp_path / "out")
    _compare(got, expected, top_k=case.split("-")[0] in TOP_K_METHODS)
    reference = load_file(base / "model.safetensors")
    changed = sum(int((expected[n] != reference[n]).sum()) for n in expected)
    assert changed > sum(t.numel() for t in expected.values()) / 5, "the merge left the base unchanged"


def test_karcher_honours_weights_where_mergekit_ignores_them(family8, mergekit_outputs, tmp_path: Path) -> None:
    """Documented difference: mergekit's karcher has no 'weight' (always 1/N). Equal weights
    give its result; unequal weights give a different, weighted mean."""
    base, experts = family8
    recipe = build_recipes(base, experts)["karcher-3"]
    expected = mergekit_outputs["karcher-3"]
    equal = dict(recipe, models=_models(experts[:3], [{"weight": 2.0}] * 3))
    _compare(_ours(equal, tmp_path / "equal"), expected, top_k=False)
    unequal = dict(recipe, models=_models(experts[:3], [{"weight": 1.0}, {"weight": 0.2}, {"weight": 4.0}]))
    got = _ours(unequal, tmp_path / "unequal")
    name = "model.layers.0.mlp.up_proj.weight"
    assert float((got[name] - expected[name]).abs().max()) > 1e-3
    # and it moves towards the heavily weighted model
    third = load_file(experts[2] / "model.safetensors")[name]
    assert torch.dist(got[name], third) < torch.dist(expected[name], third)
