"""Recipe parsing, parameter resolution and the layer-group cut."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from orchestrator.errors import RecipeError
from orchestrator.parameters import evaluate_value
from orchestrator.plan import build_plan, plan_layer_groups
from orchestrator.recipe import load_recipe, parse_recipe
from orchestrator.slices import OutputSlice, SourceLayers, output_tensors, rename_layer
from tests.helpers import gta_recipe, write_recipe

MERGEKIT_RECIPE = """
models:
  - model: ./base
  - model: ./math
    parameters:
      density: [1, 0.7, 0.1]
      weight:
        - filter: mlp
          value: 0.5
        - value: 1
base_model: ./base
merge_method: ties
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
out_dtype: float16
random_seed: 3
"""


def test_mergekit_recipe_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(MERGEKIT_RECIPE)
    recipe = load_recipe(path)
    assert recipe.merge_method == "ties"
    assert recipe.model_refs() == ["./base", "./math"]
    assert recipe.out_dtype == "float16" and recipe.random_seed == 3
    assert recipe.fleet.shards is None and recipe.fleet.workers is None and recipe.fleet.device == "cpu"


def test_fleet_section(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(MERGEKIT_RECIPE + "fleet:\n  output: /tmp/x\n  shards: 4\n  workers: 2\n  device: cuda\n")
    fleet = load_recipe(path).fleet
    assert (fleet.output, fleet.shards, fleet.workers, fleet.device) == ("/tmp/x", 4, 2, "cuda")


@pytest.mark.parametrize(
    ("addition", "needle"),
    [
        ("fleet:\n  device: tpu\n", "fleet.device"),
        ("fleet:\n  shards: 0\n", "fleet.shards"),
        ("mergemethod: ties\n", "unknown key 'mergemethod'"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path: Path, addition: str, needle: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(MERGEKIT_RECIPE + addition)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, strict=True)  # an unknown key is only a warning without strict
    assert needle in str(error.value) and str(path) in str(error.value)


def test_recipe_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("models: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_gradients_and_filters_resolve_as_mergekit() -> None:
    recipe = parse_recipe({"merge_method": "ties", "models": [{"model": "a", "parameters": {"w": [{"filter": "mlp", "value": [0, 1]}, {"value": 7}]}}]})
    value = recipe.models[0].parameters["w"]
    assert evaluate_value(value, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_value(value, "model.layers.3.self_attn.q_proj.weight", 0.5) == 7
    assert evaluate_value([1.0, 0.7, 0.1], "x", 0.25) == pytest.approx(0.85)
    assert evaluate_value([1.0, 0.7, 0.1], "x", 1.0) == pytest.approx(0.1)
    assert evaluate_value(["a", "b"], "x", 0.6) == "a"


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_layer_groups_are_contiguous_and_minimise_the_largest(count: int) -> None:
    sizes = [40, 10, 10, 10, 10, 10, 10, 10, 25]
    groups = plan_layer_groups(sizes, count)
    assert len(groups) == count
    assert groups[0][0] == 0 and groups[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert all(stop > start for start, stop in groups)
    largest = max(sum(sizes[a:b]) for a, b in groups)
    best = min(
        max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
        for cuts in itertools.combinations(range(1, len(sizes)), count - 1)
    )
    assert largest == best


def test_output_tensors_embeddings_first_layers_renumbered_head_last() -> None:
    names = ["lm_head.weight", "model.layers.1.mlp.w", "model.norm.weight", "model.layers.0.mlp.w", "model.layers.10.a", "model.embed_tokens.weight"]
    slices = [
        OutputSlice((SourceLayers("a", 0, 2, {}),), None, {}),
        OutputSlice((SourceLayers("a", 10, 11, {}),), None, {}),
        OutputSlice((SourceLayers("a", 0, 1, {}),), None, {}),
    ]
    tensors = output_tensors(slices, {"a": names}, {})
    assert [t.name for t in tensors] == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.w",
        "model.layers.1.mlp.w",
        "model.layers.2.a",
        "model.layers.3.mlp.w",
        "lm_head.weight",
        "model.norm.weight",
    ]
    assert [t.inputs[0][1] for t in tensors][3:5] == ["model.layers.10.a", "model.layers.0.mlp.w"]
    assert [t.t for t in tensors][:4] == [0.0, 0.0, 1.0, 1.0]
    assert rename_layer("model.layers.12.self_attn.q_proj.weight", 3) == "model.layers.3.self_attn.q_proj.weight"


def test_plan_is_balanced_and_content_addressed(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = parse_recipe(gta_recipe("ties", base, experts))
    plan = build_plan(recipe, str(tmp_path / "out"), shards=3)
    assert [s.file for s in plan.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan.shards[0].tensors[0].name == "model.embed_tokens.weight"
    assert plan.shards[-1].tensors[-1].name == "model.norm.weight"
    sizes = [s.out_bytes for s in plan.shards]
    assert max(sizes) < 1.6 * sum(sizes) / 3
    again = build_plan(recipe, str(tmp_path / "out"), shards=3)
    assert again.plan_id == plan.plan_id
    other = build_plan(parse_recipe(gta_recipe("ties", base, experts, random_seed=12)), str(tmp_path / "out"), shards=3)
    assert other.plan_id != plan.plan_id
    assert json.loads(plan.to_json())["plan_id"] == plan.plan_id
    layer7 = next(t for s in plan.shards for t in s.tensors if t.name == "model.layers.7.mlp.up_proj.weight")
    assert [p["weight"] for p in layer7.model_params] == pytest.approx([0.9, 0.8, 0.7])
    embed = plan.shards[0].tensors[0]
    assert [p["weight"] for p in embed.model_params] == pytest.approx([0.3, 0.5, 0.7])
    assert not (tmp_path / "out").exists()


def test_too_many_shards(family, tmp_path: Path) -> None:
    base, experts = family
    with pytest.raises(RecipeError, match="more than the 75 tensors"):
        build_plan(parse_recipe(gta_recipe("ties", base, experts)), str(tmp_path / "out"), shards=500)


def test_plan_explain_accounts_for_every_byte(family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mergefleet import cli

    base, experts = family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts))
    assert cli.main(["plan", str(recipe), str(tmp_path / "out"), "--shards", "3", "--explain", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    groups = result["groups"]
    assert [g["group"] for g in groups][0] == "pre" and groups[-1]["group"] == "post"
    assert len([g for g in groups if g["group"].startswith("layer ")]) == 8
    for shard in result["shards"]:
        mine = [g for g in groups if g["shard"] == shard["index"]]
        assert sum(g["bytes_read"] for g in mine) == shard["bytes_in"]
        assert sum(g["bytes_written"] for g in mine) == shard["bytes_out"]
    embedding_inputs = 4 * 96 * 32 * 4  # base and three experts, float32
    assert groups[0]["peak_bytes"] > embedding_inputs
