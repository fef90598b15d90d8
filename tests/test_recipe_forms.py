"""Recipe forms beyond a plain model list: slices, tokenizer sources, chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergefleet.fixtures.synthetic import LlamaShape, fine_tuned, random_weights, save_checkpoint, save_word_tokenizer
from orchestrator.errors import RecipeError
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests.helpers import read_tensors
from tests.test_mergekit_differential import mergefleet_tensors, mergekit_tensors


def frankenmerge(base: Path, experts: list[Path]) -> dict:
    return {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": str(experts[0]), "layer_range": [0, 5], "parameters": {"weight": 1.0}}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [3, 8], "parameters": {"weight": 1.0}}]},
        ],
        "dtype": "float32",
    }


def test_frankenmerge_repeats_layers_and_renames_them(family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, experts = family
    out = tmp_path / "franken"
    merge(parse_recipe(frankenmerge(base, experts)), str(out), shards=3)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 10
    tensors = read_tensors(out)
    first = load_file(experts[0] / "model.safetensors")
    second: dict[str, torch.Tensor] = {}
    for file in experts[1].glob("*.safetensors"):
        second |= load_file(file)
    assert torch.equal(tensors["model.layers.4.mlp.up_proj.weight"], first["model.layers.4.mlp.up_proj.weight"])
    assert torch.equal(tensors["model.layers.5.mlp.up_proj.weight"], second["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(tensors["model.layers.9.self_attn.o_proj.weight"], second["model.layers.7.self_attn.o_proj.weight"])
    assert torch.equal(tensors["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(tensors["lm_head.weight"], second["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 10
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_slices_with_gradients_match_mergekit(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 4]},
                    {"model": str(experts[0]), "layer_range": [0, 4], "parameters": {"weight": [0.2, 1.0]}},
                    {"model": str(experts[2]), "layer_range": [0, 4], "parameters": {"weight": 0.5}},
                ]
            },
            {
                "sources": [
                    {"model": str(base), "layer_range": [2, 8]},
                    {"model": str(experts[1]), "layer_range": [2, 8], "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.3}]}},
                ],
                "parameters": {"lambda": 0.7},
            },
        ],
        "dtype": "float32",
    }
    expected = mergekit_tensors(recipe, tmp_path)
    got = mergefleet_tensors(recipe, tmp_path, shards=4)
    assert got.keys() == expected.keys()
    assert len([n for n in got if n.endswith("mlp.up_proj.weight")]) == 10
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-6), name


def test_layer_range_outside_the_model(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = frankenmerge(base, experts)
    recipe["slices"][1]["sources"][0]["layer_range"] = [3, 12]
    with pytest.raises(RecipeError, match=r"slices\[1\].*outside its 8 layers"):
        merge(parse_recipe(recipe), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


SMALL = LlamaShape(hidden=16, layers=2, intermediate=32, vocab=0, heads=2, kv_heads=1)


def model_with_words(path: Path, words: list[str], weights: dict[str, torch.Tensor] | None = None) -> Path:
    shape = LlamaShape(**{**SMALL.__dict__, "vocab": 4 + len(words)})
    save_checkpoint(path, weights or random_weights(shape, seed=1), shape)
    save_word_tokenizer(path, words)
    return path


def test_tokenizer_union_takes_new_rows_from_their_owner(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_words = [f"w{i}" for i in range(12)]
    shape = LlamaShape(**{**SMALL.__dict__, "vocab": 16})
    base_weights = random_weights(shape, seed=1)
    base = model_with_words(tmp_path / "base", base_words, base_weights)
    same = model_with_words(tmp_path / "same", base_words, fine_tuned(base_weights, seed=2))
    other_words = base_words[:8] + ["alpha", "beta", "gamma"]  # drops w8..w11, adds three words
    other_shape = LlamaShape(**{**SMALL.__dict__, "vocab": 4 + len(other_words)})
    other_weights = fine_tuned(random_weights(other_shape, seed=1), seed=3)
    other = model_with_words(tmp_path / "other", other_words, other_weights)

    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(base)},
            {"model": str(same), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(other), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "tokenizer_source": "union",
        "chat_template": "chatml",
    }
    out = tmp_path / "out"
    merge(parse_recipe(recipe), str(out), shards=2)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 alpha gamma w9").input_ids
    assert ids[0] == 5 and ids[3] == 13 and ids[1] >= 16 and ids[2] >= 16
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 19 == len(tokenizer)
    merged = read_tensors(out)
    assert merged["model.embed_tokens.weight"].shape == (19, 16)
    alpha = tokenizer.convert_tokens_to_ids("alpha")
    assert torch.equal(merged["model.embed_tokens.weight"][alpha], other_weights["model.embed_tokens.weight"][4 + 8])
    assert torch.equal(merged["lm_head.weight"][alpha], other_weights["lm_head.weight"][4 + 8])
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape[-1] == 19 and torch.isfinite(logits).all()


def test_unknown_tokenizer_source_and_chat_template(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = frankenmerge(base, experts) | {"tokenizer_source": "nowhere"}
    with pytest.raises(RecipeError, match="tokenizer_source 'nowhere'"):
        merge(parse_recipe(recipe), str(tmp_path / "out"))
    recipe = frankenmerge(base, experts) | {"chat_template": "klingon"}
    with pytest.raises(RecipeError, match="chat_template 'klingon'.*chatml"):
        merge(parse_recipe(recipe), str(tmp_path / "out"))
