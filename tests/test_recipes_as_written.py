"""Recipes as people write them, against mergekit 0.1.5: what it ignores, what it refuses,
its ``tokenizer:`` section, and the model card and ``mergekit_config.yml`` in the output.

mergekit runs once for the module (one subprocess, tests/mergekit_runner.py) on tiny
checkpoints built here; each test compares mergefleet with what mergekit did.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from mergefleet import cli
from mergefleet.fixtures.synthetic import LlamaShape, fine_tuned, random_weights, save_checkpoint, save_word_tokenizer
from orchestrator.errors import RecipeError
from orchestrator.evaluate.runner import CheckpointScores
from orchestrator.evaluate.scores import Evaluation
from orchestrator.model_card import model_card
from orchestrator.pipeline import merge
from orchestrator.plan import build_plan
from orchestrator.recipe import load_recipe, parse_recipe
from tests.helpers import MERGEFLEET, TINY, write_recipe
from tests.mergekit_runner import assert_same_bytes, load_tensors, run_mergekit

SMALL = LlamaShape(hidden=16, layers=2, intermediate=32, vocab=0, heads=2, kv_heads=1)
BASE_WORDS = [f"w{i}" for i in range(12)]
OTHER_WORDS = BASE_WORDS[:8] + ["alpha", "beta", "gamma"]  # lacks w8..w11, has three words the base lacks


def _worded(path: Path, words: list[str], weights: dict[str, torch.Tensor]) -> str:
    shape = LlamaShape(**{**SMALL.__dict__, "vocab": 4 + len(words)})
    save_checkpoint(path, weights, shape)
    save_word_tokenizer(path, words)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A TINY family (base, a, b) and three small models with word tokenizers (w_base, w_same, w_other)."""
    root = tmp_path_factory.mktemp("as-written")
    weights = random_weights(TINY, seed=5)
    paths = {"base": str(save_checkpoint(root / "base", weights, TINY))}
    for i, name in enumerate(("a", "b")):
        paths[name] = str(save_checkpoint(root / name, fine_tuned(weights, seed=20 + i), TINY))
    small = random_weights(LlamaShape(**{**SMALL.__dict__, "vocab": 16}), seed=1)
    paths["w_base"] = _worded(root / "w_base", BASE_WORDS, small)
    paths["w_same"] = _worded(root / "w_same", BASE_WORDS, fine_tuned(small, seed=2))
    other = random_weights(LlamaShape(**{**SMALL.__dict__, "vocab": 4 + len(OTHER_WORDS)}), seed=1)
    paths["w_other"] = _worded(root / "w_other", OTHER_WORDS, fine_tuned(other, seed=3))
    return paths


def ignored_by_mergekit(m: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Recipes whose parameters the method does not read: mergekit accepts and ignores them."""
    return {
        "model_stock_weight": {
            "merge_method": "model_stock",
            "base_model": m["base"],
            "models": [{"model": m["a"], "parameters": {"weight": 0.9}}, {"model": m["b"], "parameters": {"weight": 0.2}}],
        },
        "sce_weight": {
            "merge_method": "sce",
            "base_model": m["base"],
            "models": [{"model": m["a"], "parameters": {"weight": 1.0}}, {"model": m["b"], "parameters": {"weight": 0.4}}],
            "parameters": {"select_topk": 0.5},
        },
        # normalize is merge-wide: set under one model it is not read (the weights still sum to 2)
        "linear_normalize_per_model": {
            "merge_method": "linear",
            "models": [{"model": m["a"], "parameters": {"weight": 1.0, "normalize": False}}, {"model": m["b"], "parameters": {"weight": 1.0}}],
        },
    }


def tokenizer_recipes(m: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The ``tokenizer:`` section in each of its forms (and ``tokenizer_source`` beside it)."""
    weights = [{"model": m["w_base"], "parameters": {"weight": 0.5}}, {"model": m["w_same"], "parameters": {"weight": 0.3}},
               {"model": m["w_other"], "parameters": {"weight": 0.2}}]
    tokens = {
        "gamma": {"source": m["w_other"], "force": True},  # every model gets w_other's row
        "w9": {"source": {"kind": "model_token", "model": m["w_other"], "token": "w1"}},  # w_other lacks w9: its w1 row
        "beta": {"source": {"kind": "model_token", "model": m["w_base"], "token_id": 3}},
        "w2": {"source": {"kind": "zero"}, "force": True},
        "<new>": {"source": {"kind": "zero"}},  # no model has it: added to the tokenizer
    }
    return {
        "tokens_union_padded": {"merge_method": "linear", "base_model": m["w_base"], "models": weights,
                                "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}},
        "base_padded": {"merge_method": "ties", "base_model": m["w_base"],
                        "models": [{"model": m["w_same"], "parameters": {"weight": 1.0, "density": 0.5}},
                                   {"model": m["w_other"], "parameters": {"weight": 1.0, "density": 0.5}}],
                        "tokenizer": {"source": "base", "pad_to_multiple_of": 32}},
        "model_source_forced": {"merge_method": "linear", "models": weights[1:],
                                "tokenizer": {"source": m["w_other"], "tokens": {"w1": {"source": m["w_same"], "force": True}}}},
        "tokenizer_source_union": {"merge_method": "linear", "models": weights[1:], "tokenizer_source": "union"},
    }


@pytest.fixture(scope="module")
def mergekit(models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """mergekit's result (tensors, or its error) for every recipe of this module, plus
    ``card_config``: the mergekit_config.yml mergefleet wrote for model_stock_weight."""
    root = tmp_path_factory.mktemp("as-written-mergekit")
    ours = root / "ours-model-stock"
    merge(parse_recipe(ignored_by_mergekit(models)["model_stock_weight"]), str(ours))
    recipes = ignored_by_mergekit(models) | tokenizer_recipes(models)
    recipes["duplicate"] = {"merge_method": "linear", "models": [{"model": models["a"], "parameters": {"weight": 1.0}},
                                                                 {"model": models["a"], "parameters": {"weight": 2.0}}]}
    recipes["card_config"] = yaml.safe_load((ours / "mergekit_config.yml").read_text())
    results = run_mergekit(recipes, root)
    results["ours_model_stock"] = load_tensors(ours)
    results["root"] = root
    return results


# ---------------------------------------------------------------- what mergekit ignores


@pytest.mark.slow  # runs mergekit
@pytest.mark.parametrize("name", ["model_stock_weight", "sce_weight", "linear_normalize_per_model"])
def test_unused_parameters_warn_once_and_merge_as_mergekit(name: str, models, mergekit, tmp_path: Path, caplog) -> None:
    recipe = ignored_by_mergekit(models)[name]
    with caplog.at_level(logging.WARNING, logger="orchestrator.recipe"):
        parsed = parse_recipe(recipe)
    warnings = [r.getMessage() for r in caplog.records if r.name == "orchestrator.recipe"]
    assert len(warnings) == 1 and parsed.warnings == warnings, warnings
    assert ("parameters.normalize" if "normalize" in name else "parameters.weight") in warnings[0]
    assert "ignored" in warnings[0]
    expected = mergekit[name]
    assert isinstance(expected, dict), f"mergekit failed on {name}: {expected}"
    merge(parsed, str(tmp_path / "out"), shards=2)
    got = load_tensors(tmp_path / "out")
    if name.startswith("linear"):
        assert_same_bytes(got, expected, label=name)
    else:  # float32 model_stock and sce agree with mergekit to 1e-6, as in test_mergekit_methods
        assert got.keys() == expected.keys()
        for tensor, want in expected.items():
            assert torch.allclose(got[tensor], want, rtol=0, atol=1e-6), f"{name}: {tensor}"
    with pytest.raises(RecipeError, match="--strict refuses parameters"):
        parse_recipe(recipe, strict=True)


def test_unknown_keys_warn_with_the_closest_key_and_change_nothing(models, caplog) -> None:
    clean = ignored_by_mergekit(models)["model_stock_weight"]
    typos = clean | {
        "merge_methd": "ties",
        "models": [clean["models"][0] | {"paramters": {"weight": 1}}, clean["models"][1]],
        "fleet": {"shards": 2, "wrokers": 2, "eval": {"tasks": ["x"], "task": ["y"]}},
        "tokenizer": {"source": "base", "pad_to_multipel_of": 8},
    }
    with caplog.at_level(logging.WARNING, logger="orchestrator.recipe"):
        parsed = parse_recipe(typos, source="r.yaml")
    logged = [r.getMessage() for r in caplog.records if r.name == "orchestrator.recipe"]
    for wrong, right in [("merge_methd", "merge_method"), ("models[0].paramters", "models[0].parameters"),
                         ("fleet.wrokers", "fleet.workers"), ("fleet.eval.task", "fleet.eval.tasks"),
                         ("tokenizer.pad_to_multipel_of", "tokenizer.pad_to_multiple_of")]:
        line = f"r.yaml: unknown key '{wrong}'; did you mean '{right}'?"
        assert sum(message.startswith(line) for message in logged) == 1, (line, logged)
    assert parsed.warnings == logged
    assert parsed.merge_method == "model_stock" and parsed.fleet.workers is None  # the misspelt key set nothing
    assert parsed.recipe_hash() == parse_recipe(clean | {"tokenizer": {"source": "base"}}).recipe_hash()
    with pytest.raises(RecipeError, match=r"^r\.yaml: unknown key 'models\[0\]\.paramters'; did you mean 'models\[0\]\.parameters'\?"):
        parse_recipe(typos, source="r.yaml", strict=True)  # the first, in the order the recipe gives them
    with pytest.raises(RecipeError, match="unknown key 'fleet.storage.bucket'; allowed here: .*endpoint_url"):
        parse_recipe(clean | {"fleet": {"storage": {"bucket": "x"}}}, strict=True)
    with pytest.raises(RecipeError, match="looks like a credential"):  # never dropped quietly, strict or not
        parse_recipe(clean | {"fleet": {"storage": {"secret_key": "x"}}})


# ---------------------------------------------------------------- what mergekit refuses


@pytest.mark.slow  # runs mergekit
def test_a_model_listed_twice_is_refused_as_mergekit_refuses_it(models, mergekit) -> None:
    assert isinstance(mergekit["duplicate"], str) and "Duplicate merge inputs" in mergekit["duplicate"]
    a, b = models["a"], models["b"]
    with pytest.raises(RecipeError, match=rf"^r\.yaml: models\[1\] \({a}\) repeats models\[0\]; a model may be listed once"):
        parse_recipe({"merge_method": "linear", "models": [a, a]}, source="r.yaml")
    sliced = {"merge_method": "linear", "slices": [{"sources": [{"model": a, "layer_range": [0, 8]}, {"model": b, "layer_range": [0, 8]},
                                                               {"model": a, "layer_range": [0, 8]}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]\.sources\[2\] .* repeats slices\[0\]\.sources\[0\]"):
        parse_recipe(sliced)
    both = {"merge_method": "ties", "base_model": a, "models": [{"model": a}, {"model": b, "parameters": {"weight": 1.0}}]}
    assert parse_recipe(both).model_refs() == [a, b]  # the base listed among the models is not a repeat (mergekit agrees)


# ---------------------------------------------------------------- tokenizer:


def _rows_by_token(out: Path) -> tuple[dict[str, int], dict[str, torch.Tensor], dict[str, Any]]:
    return AutoTokenizer.from_pretrained(out).get_vocab(), load_tensors(out), json.loads((out / "config.json").read_text())


@pytest.mark.slow  # runs mergekit
@pytest.mark.parametrize("name", ["tokens_union_padded", "base_padded", "model_source_forced", "tokenizer_source_union"])
def test_tokenizer_section_gives_mergekits_rows(name: str, models, mergekit, tmp_path: Path) -> None:
    """Same vocabulary, and every token's embedding and head row equal to mergekit's; padding
    rows by position. Rows are matched by token: mergekit appends a union's new tokens in the
    order of its Python sets and dicts, which is not stable from run to run."""
    assert isinstance(mergekit[name], dict), f"mergekit failed on {name}: {mergekit[name]}"
    merge(parse_recipe(tokenizer_recipes(models)[name]), str(tmp_path / "out"), shards=2)
    vocab, got, config = _rows_by_token(tmp_path / "out")
    want_vocab, want, want_config = _rows_by_token(mergekit["root"] / f"{name}-out")
    assert vocab.keys() == want_vocab.keys()
    assert config["vocab_size"] == want_config["vocab_size"]
    assert got.keys() == want.keys()
    for tensor, rows in want.items():
        if rows.shape[0] != want_config["vocab_size"]:
            assert torch.equal(got[tensor], rows), tensor
            continue
        assert got[tensor].shape == rows.shape, tensor
        for token, row in want_vocab.items():
            assert torch.equal(got[tensor][vocab[token]], rows[row]), (tensor, token)
        # a padding row is the mean of every row: summed in vocabulary order, so to rounding
        assert torch.allclose(got[tensor][len(vocab):], rows[len(want_vocab):], rtol=0, atol=1e-6), f"{tensor}: padding rows"
        assert len(vocab) < rows.shape[0] or "padded" not in name


def test_tokenizer_section_errors_name_the_token(models, tmp_path: Path) -> None:
    recipe = tokenizer_recipes(models)["model_source_forced"]
    lacking = recipe | {"tokenizer": {"source": "union", "tokens": {"alpha": {"source": models["w_same"]}}}}
    with pytest.raises(RecipeError, match=r"tokenizer\.tokens\.alpha\.source: .*w_same's tokenizer has no token 'alpha'"):
        build_plan(parse_recipe(lacking), str(tmp_path / "out"))
    elsewhere = recipe | {"tokenizer": {"source": "union", "tokens": {"alpha": {"source": models["a"]}}}}
    with pytest.raises(RecipeError, match=r"tokenizer\.tokens\.alpha\.source: .* is not one of the recipe's models"):
        build_plan(parse_recipe(elsewhere), str(tmp_path / "out"))
    with pytest.raises(RecipeError, match="tokenizer.source 'nowhere'"):
        build_plan(parse_recipe(recipe | {"tokenizer": {"source": "nowhere"}}), str(tmp_path / "out"))
    with pytest.raises(RecipeError, match="either 'tokenizer_source:' or 'tokenizer:'"):
        parse_recipe(recipe | {"tokenizer_source": "union"})


# ---------------------------------------------------------------- the output's model card


@pytest.mark.slow  # runs mergekit
def test_mergekit_config_redoes_the_merge_in_mergekit(mergekit) -> None:
    """mergekit, given the mergekit_config.yml of our model_stock merge, merges what its own
    run of the original recipe merged (and what ours did, to float32 model_stock's 1e-6)."""
    assert isinstance(mergekit["card_config"], dict), f"mergekit failed on mergekit_config.yml: {mergekit['card_config']}"
    assert_same_bytes(mergekit["card_config"], mergekit["model_stock_weight"], label="mergekit_config.yml")
    for tensor, ours in mergekit["ours_model_stock"].items():
        assert torch.allclose(ours, mergekit["card_config"][tensor], rtol=0, atol=1e-6), tensor


def test_model_card_and_mergekit_config(models, tmp_path: Path) -> None:
    recipe = ignored_by_mergekit(models)["model_stock_weight"] | {
        "name": "stock-soup",
        "fleet": {"experiment": "private-experiment-name", "tracking_uri": "http://127.0.0.1:1/private-path"},
    }
    out = tmp_path / "out"
    merge(parse_recipe(recipe), str(out))
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"base_model": [models["base"], models["a"], models["b"]], "library_name": "transformers", "tags": ["merge", "mergefleet"]}
    assert body.startswith("# stock-soup\n") and "`model_stock`" in body
    assert f"| {models['a']} | expert | {{\"weight\": 0.9}} |" in body
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config == {key: value for key, value in recipe.items() if key != "fleet"}
    for text in (card, (out / "mergekit_config.yml").read_text()):
        assert "private-experiment-name" not in text and "private-path" not in text and "fleet:" not in text
    manifest = json.loads((out / "mergefleet.json").read_text())
    assert manifest["card_files"] == ["README.md", "mergekit_config.yml"]
    assert not [p.name for p in out.iterdir() if ".partial" in p.name or p.name.startswith(".README")]

    # scores, once evaluated (the merge_and_eval flow rewrites the card after evaluation)
    plan = build_plan(parse_recipe(recipe), str(out))
    scores = {"merged": {"arc": 0.61}, "base": {"arc": 0.5}, models["a"]: {"arc": 0.55}}
    evaluation = Evaluation(
        tasks=["arc"],
        merged=CheckpointScores(model=str(out), fingerprint="m", scores=scores["merged"], primary={"arc": "acc"}, metrics={}, seconds=1.0),
        base=CheckpointScores(model=models["base"], fingerprint="b", scores=scores["base"], primary={"arc": "acc"}, metrics={}, seconds=1.0),
        experts={models["a"]: CheckpointScores(model=models["a"], fingerprint="a", scores=scores[models["a"]], primary={"arc": "acc"}, metrics={}, seconds=1.0)},
        normalised={"arc": 1.22},
    )
    scored = model_card(plan, evaluation)
    assert "## Evaluation" in scored and "| arc | 0.6100 | 0.5000 | 0.5500 | 1.220 |" in scored
    assert "## Evaluation" not in card


def test_a_readme_the_merge_did_not_write_is_left_alone(models, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    recipes = ignored_by_mergekit(models)
    merge(parse_recipe(recipes["model_stock_weight"]), str(out))
    assert (out / "README.md").read_text() == "my notes\n"
    assert json.loads((out / "mergefleet.json").read_text())["card_files"] == ["mergekit_config.yml"]

    other = tmp_path / "other"
    merge(parse_recipe(recipes["model_stock_weight"]), str(other))
    first_card = (other / "README.md").read_text()
    merge(parse_recipe(recipes["sce_weight"]), str(other), overwrite=True)  # a different merge replaces the card it recorded
    assert (other / "README.md").read_text() != first_card and "`sce`" in (other / "README.md").read_text()
    assert json.loads((other / "mergefleet.json").read_text())["card_files"] == ["README.md", "mergekit_config.yml"]


# ---------------------------------------------------------------- through the command line


def test_command_line_warns_refuses_with_strict_and_points_at_yaml_errors(models, tmp_path: Path, capsys) -> None:
    recipe = ignored_by_mergekit(models)["model_stock_weight"] | {"merge_methd": "ties"}
    path = write_recipe(tmp_path / "typo.yaml", recipe)
    # a process of its own: the warnings reach the terminal through the command's own logging set-up
    done = subprocess.run([*MERGEFLEET, "plan", str(path), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())  # the terminal may wrap a long line
    assert text.count("unknown key 'merge_methd'; did you mean 'merge_method'?") == 1, done.stderr
    assert text.count("'model_stock' does not use") == 1, done.stderr

    assert cli.main(["plan", "--strict", str(path), str(tmp_path / "strict")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path}: unknown key 'merge_methd'; did you mean 'merge_method'? (--strict refuses keys mergekit would ignore)"
    ]
    assert not (tmp_path / "strict").exists()

    replaced = {key: value for key, value in recipe.items() if key != "merge_method"}  # the misspelling instead of the key
    assert cli.main(["plan", str(write_recipe(tmp_path / "replaced.yaml", replaced)), str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'replaced.yaml'}: missing required key 'merge_method': unknown key 'merge_methd'; did you mean 'merge_method'?"
    ]

    broken = tmp_path / "broken.yaml"
    broken.write_text(f"merge_method: linear\nmodels:\n  - model: {models['a']}\n   - model: {models['b']}\n")
    assert cli.main(["merge", str(broken), str(tmp_path / "never")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}:4:4: not valid YAML: "), lines
    assert not (tmp_path / "never").exists()


def test_load_recipe_yaml_errors_carry_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nmodels: [a, b\nbase_model: c\n")
    with pytest.raises(RecipeError, match=rf"^{path}:3:11: not valid YAML: "):
        load_recipe(path)
