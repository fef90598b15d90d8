"""End to end on one machine: recipe → plan → shards → checkpoint that transformers loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests.helpers import gta_recipe, read_tensors

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "ties_sv"]


def recipe_for(method: str, base: Path, experts: list[Path]):
    if method == "linear":
        data = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip([base, *experts], [1, 2, 3, 4])],
        }
    else:
        data = gta_recipe(method, base, experts)
        if method == "ties_sv":
            data["models"][1]["parameters"]["protect"] = True
            data["parameters"] = {"slack": 0.2}
    return parse_recipe(data)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_merge_is_byte_identical_to_unsharded(method: str, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = recipe_for(method, base, experts)
    reference = merge(recipe, str(tmp_path / "one"), shards=1, workers=1)
    assert reference.shards == 1
    expected = read_tensors(tmp_path / "one")
    assert len(expected) == 2 + 9 * 8 + 1
    for shards in (3, 7):
        summary = merge(recipe, str(tmp_path / f"s{shards}"), shards=shards, workers=2)
        assert summary.shards == shards
        files = sorted(p.name for p in (tmp_path / f"s{shards}").glob("*.safetensors"))
        assert files == [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        got = read_tensors(tmp_path / f"s{shards}")
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype
            assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_merged_checkpoint_loads_in_transformers(family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, experts = family
    out = tmp_path / "merged"
    merge(recipe_for("ties", base, experts), str(out), shards=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    files = read_tensors(out)
    state = model.state_dict()
    for name, tensor in files.items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 14]])).logits
    assert logits.shape == (1, 4, 96)
    assert torch.isfinite(logits).all()


def test_receipts_and_manifest_describe_the_files(family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "merged"
    summary = merge(recipe_for("ties_sv", base, experts), str(out), shards=3)
    manifest = json.loads((out / "mergefleet.json").read_text())
    assert manifest["plan_id"] == summary.plan_id
    assert [i["name"] for i in manifest["inputs"]] == [str(base), *map(str, experts)]
    assert all(i["fingerprints"] for i in manifest["inputs"])
    for entry in manifest["files"]:
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    for index in range(3):
        receipt = json.loads((out / f".mergefleet/shard-{index}.json").read_text())
        assert receipt["plan_id"] == summary.plan_id
        assert receipt["bytes_read"] == receipt["tensor_bytes"] > 0
    with safe_open(out / manifest["files"][0]["file"], "pt") as handle:
        assert handle.metadata()["mergefleet_plan_id"] == summary.plan_id
    rates = manifest["report"]["protected_drop_rate"]
    assert len(rates) == 1 and 0.0 <= rates[0] < 1.0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_rerun_skips_finished_shards(family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "merged"
    recipe = recipe_for("ties", base, experts)
    merge(recipe, str(out), shards=3)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = merge(recipe, str(out), shards=3)
    assert again.shards_skipped == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before


def test_tokenizer_files_of_the_base_are_copied(family, tmp_path: Path) -> None:
    import shutil

    base, experts = family
    with_tokenizer = tmp_path / "base"
    shutil.copytree(base, with_tokenizer)
    (with_tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    out = tmp_path / "merged"
    merge(recipe_for("ties", with_tokenizer, experts), str(out))
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
