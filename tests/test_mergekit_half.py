"""Differential in half precision: mergekit 0.1.5's bytes for recipes in bfloat16 and float16.

Under the default match-mergekit precision every deterministic method must give mergekit's
tensors: identical, or one unit in the last place for at most 1 element in 10⁴. The inputs
are tiny Llama checkpoints stored in the recipe's dtype (so task vectors are quantised and
top-k selections meet many equal magnitudes), plus float32 checkpoints merged in bfloat16
(mergekit casts them first) and the four newest methods in float32. mergekit runs once for
all recipes (tests/mergekit_runner.py). The random methods run and keep the fraction their
density asks for; ``precision: float32`` is shown to change the arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.methods import get_method
from orchestrator.methods.base import TensorTask
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from mergefleet.fixtures.synthetic import fine_tuned, random_weights, save_checkpoint
from tests.helpers import TINY
from tests.mergekit_runner import assert_same_bytes, load_tensors, run_mergekit

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _family(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    weights = random_weights(TINY, seed=23, dtype=dtype)
    base = save_checkpoint(root / "base", weights, TINY)
    return base, [save_checkpoint(root / f"expert{i + 1}", fine_tuned(weights, seed=40 + i), TINY) for i in range(3)]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("half-families")
    return {name: _family(root / name, dtype) for name, dtype in {**HALF, "float32": torch.float32}.items()}


def _models(paths: list[Path], params: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [{"model": str(p), **({"parameters": q} if q else {})} for p, q in zip(paths, params)]


WEIGHTS = [{"weight": [0.7, 0.4]}, {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.35}]}, {"weight": 0.55}]


def method_recipes(base: Path, experts: list[Path]) -> dict[str, dict[str, Any]]:
    """One recipe per deterministic method (two for some), without ``dtype``."""
    three = [base, *experts]
    sparse = [dict(w, density=d) for w, d in zip(WEIGHTS, ([0.3, 0.6], 0.5, 0.25))]
    crumbs = [dict(w, density=0.6, gamma=g) for w, g in zip(WEIGHTS, (0.02, 0.1, 0.0))]
    return {
        "linear": {"merge_method": "linear", "models": _models(three, [{"weight": 0.3}, *WEIGHTS])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base), "models": _models(three, [None, *WEIGHTS]), "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": str(base), "models": _models(three, [None, *sparse])},
        "ties-unnormalised": {"merge_method": "ties", "base_model": str(base), "models": _models(three, [None, *sparse]), "parameters": {"normalize": False, "lambda": 1.3}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": str(base), "models": _models(three, [None, *crumbs])},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": str(base), "models": _models(three, [None, *crumbs]), "parameters": {"normalize": True}},
        "slerp": {"merge_method": "slerp", "base_model": str(base), "models": _models([base, experts[0]], [None, None]), "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.6]}, {"value": 0.3}]}},
        "nuslerp": {"merge_method": "nuslerp", "models": _models(experts[:2], [{"weight": 0.3}, {"weight": [0.5, 1.0]}]), "parameters": {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}]}},
        "nuslerp-base": {"merge_method": "nuslerp", "base_model": str(base), "models": _models(three[:3], [None, {"weight": 1.0}, {"weight": 0.4}]), "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": [{"filter": "self_attn", "value": True}, {"value": False}]}},
        "multislerp": {"merge_method": "multislerp", "models": _models(experts, WEIGHTS)},
        "multislerp-base": {"merge_method": "multislerp", "base_model": str(base), "models": _models(three, [None, *WEIGHTS]), "parameters": {"normalize_weights": False}},
        "karcher": {"merge_method": "karcher", "models": _models(experts, [None] * 3), "parameters": {"max_iter": [{"filter": "mlp", "value": 3}, {"value": 10}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": str(base), "models": _models(three, [None] * 4), "parameters": {"filter_wise": [{"filter": "self_attn", "value": True}, {"value": False}]}},
        "sce": {"merge_method": "sce", "base_model": str(base), "models": _models(three, [None] * 4), "parameters": {"select_topk": [0.3, 0.8]}},
        "passthrough": {"merge_method": "passthrough", "models": _models([experts[1]], [{"scale": [{"filter": "norm", "value": 1.5}, {"value": 0.7}]}])},
        "nearswap": {"merge_method": "nearswap", "base_model": str(base), "models": _models([base, experts[0]], [None, None]), "parameters": {"t": [0.002, 0.02]}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": str(base), "models": _models([base, experts[2]], [None, None])},
        "ram": {"merge_method": "ram", "base_model": str(base), "models": _models(three, [None] * 4), "parameters": {"epsilon": 0.004}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": str(base), "models": _models(three, [None] * 4), "parameters": {"epsilon": 0.004, "r": 0.4, "alpha": 0.5}},
    }


NEWEST = ("nearswap", "arcee_fusion", "ram", "ramplus_tl")
CAST_FROM_FLOAT32 = ("linear", "ties", "breadcrumbs", "slerp", "sce", "multislerp", "arcee_fusion", "ramplus_tl")


def all_recipes(families: dict[str, tuple[Path, list[Path]]]) -> dict[str, dict[str, Any]]:
    recipes: dict[str, dict[str, Any]] = {}
    for dtype in HALF:
        for name, recipe in method_recipes(*families[dtype]).items():
            recipes[f"{name}@{dtype}"] = recipe | {"dtype": dtype}
    f32 = method_recipes(*families["float32"])
    for name in CAST_FROM_FLOAT32:  # float32 inputs, cast to bfloat16 first; output float32
        recipes[f"{name}@float32-as-bfloat16"] = f32[name] | {"dtype": "bfloat16", "out_dtype": "float32"}
    for name in NEWEST:
        recipes[f"{name}@float32"] = f32[name] | {"dtype": "float32"}
    bf16 = method_recipes(*families["bfloat16"])
    for name in ("ties", "sce", "breadcrumbs"):  # bfloat16 inputs in float32: equal values stay equal
        recipes[f"{name}@bfloat16-as-float32"] = bf16[name] | {"dtype": "float32"}
    return recipes


@pytest.fixture(scope="module")
def mergekit_outputs(families, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_mergekit(all_recipes(families), tmp_path_factory.mktemp("mergekit-half"))


CASES = [f"{name}@{dtype}" for dtype in HALF for name in method_recipes(Path("b"), [Path("e")] * 3)]
CASES += [f"{name}@float32-as-bfloat16" for name in CAST_FROM_FLOAT32]
CASES += [f"{name}@float32" for name in NEWEST] + [f"{name}@bfloat16-as-float32" for name in ("ties", "sce", "breadcrumbs")]


@pytest.mark.parametrize("case", CASES)
def test_same_bytes_as_mergekit(case: str, families, mergekit_outputs, tmp_path: Path) -> None:
    expected = mergekit_outputs[case]
    assert isinstance(expected, dict), f"mergekit failed on {case}: {expected}"
    recipe = all_recipes(families)[case]
    merge(parse_recipe(recipe), str(tmp_path / "out"), shards=2)
    got = load_tensors(tmp_path / "out")
    assert_same_bytes(got, expected, label=case)
    base = load_tensors(Path(recipe.get("base_model") or recipe["models"][0]["model"]))
    changed = sum(int((expected[n].float() != base[n].float()).sum()) for n in expected)
    share = 200 if case.startswith("arcee_fusion") else 20  # it takes only the outliers' changes
    assert changed > sum(t.numel() for t in expected.values()) / share, f"{case}: the merge left the inputs unchanged"


# ----------------------------------------------------------------------------- random methods


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("dtype", list(HALF))
def test_random_methods_run_in_half_precision_and_keep_their_density(method: str, dtype: str, families, tmp_path: Path) -> None:
    """One expert, weight 1, no rescale: an entry changes exactly where it is kept and its
    change survives the rounding of θ₀ + τ, so among the entries whose change would survive,
    the changed fraction estimates the kept fraction: within 3σ of the density (DARE), or
    inside DELLA's [density − ε, density + ε]."""
    base, experts = families[dtype]
    density, epsilon = 0.4, 0.1
    params: dict[str, Any] = {"weight": 1.0, "density": density}
    if method.startswith("della"):
        params["epsilon"] = epsilon
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": _models([base, experts[0]], [None, params]),
        "parameters": {"rescale": False, "normalize": False},
        "dtype": dtype,
        "random_seed": 5,
    }
    merge(parse_recipe(recipe), str(tmp_path / "out"))
    got, theta0, theta1 = (load_tensors(p) for p in (tmp_path / "out", base, experts[0]))
    survives = changed = 0
    for name, tensor in got.items():
        assert tensor.dtype == HALF[dtype] and bool(torch.isfinite(tensor).all()), name
        tau = theta1[name] - theta0[name]  # rounded to the dtype, as the merge computes it
        visible = (theta0[name] + tau) != theta0[name]
        assert not bool((tensor != theta0[name])[~visible].any()), name  # nothing changes where nothing can
        survives += int(visible.sum())
        changed += int((tensor != theta0[name])[visible].sum())
    fraction = changed / survives
    if method.startswith("dare"):
        sigma = math.sqrt(density * (1 - density) / survives)
        assert abs(fraction - density) <= 3 * sigma, (fraction, density, sigma)
    else:
        assert density - epsilon <= fraction <= density + epsilon, fraction


# ----------------------------------------------------------------------------- the precision option


def test_precision_float32_computes_in_float32_and_rounds_once(families, mergekit_outputs, tmp_path: Path) -> None:
    """``fleet.precision: float32`` keeps the float32 arithmetic: the engine's result is the
    float32 merge of the stored inputs rounded once - not mergekit's bytes."""
    from orchestrator.plan import build_plan

    recipe = parse_recipe(all_recipes(families)["ties@bfloat16"] | {"fleet": {"precision": "float32"}})
    merge(recipe, str(tmp_path / "out"))
    got = load_tensors(tmp_path / "out")
    base, experts = families["bfloat16"]
    theta0, thetas = load_tensors(base), [load_tensors(e) for e in experts]
    planned = {t.name: t for shard in build_plan(recipe, str(tmp_path / "plan")).shards for t in shard.tensors}
    for name in ("model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"):
        tensor = planned[name]
        task = TensorTask(name, theta0[name], [t[name] for t in thetas], tensor.model_params, tensor.global_params)
        float32 = get_method("ties").merge(task).tensor
        assert float32.dtype == torch.float32
        assert torch.equal(got[name], float32.to(torch.bfloat16)), name
    differing = sum(int((got[n] != mergekit_outputs["ties@bfloat16"][n]).sum()) for n in got)
    assert differing > sum(t.numel() for t in got.values()) / 100  # mergekit's bf16 arithmetic differs


def test_precision_is_part_of_the_plan_identity(families, tmp_path: Path) -> None:
    from orchestrator.plan import build_plan

    recipe = all_recipes(families)["ties@bfloat16"]
    default = build_plan(parse_recipe(recipe), str(tmp_path / "a"))
    float32 = build_plan(parse_recipe(recipe | {"fleet": {"precision": "float32"}}), str(tmp_path / "a"))
    assert default.precision == "match-mergekit" and float32.precision == "float32"
    assert default.dtype == "BF16" and default.plan_id != float32.plan_id
    tensor = default.shards[0].tensors[0]
    assert default.compute_dtype(tensor) == "BF16" and float32.compute_dtype(tensor) is None
