"""Bad input ends the run with a message naming the file, tensor and problem, and writes nothing."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergefleet import cli
from tests.helpers import gta_recipe, write_recipe


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.err.strip()


def variant(tmp_path: Path, source: Path, name: str, change: Callable[[Path], Any]) -> Path:
    """A copy of a checkpoint with one thing broken."""
    target = tmp_path / name
    shutil.copytree(source, target)
    change(target)
    return target


def rewrite_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    return apply


def expect_failure(capsys, tmp_path: Path, recipe: dict[str, Any], *needles: str, extra: tuple[str, ...] = ()) -> str:
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    status, message = run_cli(capsys, "merge", str(path), str(out), *extra)
    assert status != 0
    assert message.startswith("error: ")
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message
    assert not out.exists(), f"output written despite the error: {list(out.rglob('*'))}"
    return message


def test_unknown_method(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    expect_failure(capsys, tmp_path, gta_recipe("tiez", base, experts), "unknown merge_method 'tiez'", "ties")


def test_unknown_parameter(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = gta_recipe("ties", base, experts)
    recipe["models"][1]["parameters"]["densty"] = 0.5
    expect_failure(capsys, tmp_path, recipe, "parameters.densty (did you mean 'density'?)", extra=("--strict",))  # without it: a warning


def test_unknown_recipe_key(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = gta_recipe("ties", base, experts)
    recipe["fleet"] = {"shard": 3}
    expect_failure(capsys, tmp_path, recipe, "unknown key 'fleet.shard'; did you mean 'fleet.shards'?", extra=("--strict",))


def test_missing_base_model(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = gta_recipe("ties", base, experts)
    del recipe["base_model"]
    expect_failure(capsys, tmp_path, recipe, "base_model", "ties")


def test_missing_required_weight(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = gta_recipe("ties", base, experts)
    del recipe["models"][2]["parameters"]["weight"]
    expect_failure(capsys, tmp_path, recipe, "weight", str(experts[1]))


def test_expert_missing_a_tensor(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    broken = variant(tmp_path, experts[0], "lacking", rewrite_tensors(lambda t: t.pop("model.layers.3.mlp.up_proj.weight")))
    message = expect_failure(
        capsys, tmp_path, gta_recipe("ties", base, [broken, experts[2]]), str(broken), "model.layers.3.mlp.up_proj.weight"
    )
    assert "lacks" in message


def test_expert_with_an_extra_tensor(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    extra = variant(tmp_path, experts[0], "extra", rewrite_tensors(lambda t: t.update({"model.extra.weight": torch.zeros(3)})))
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [extra]), str(extra), "model.extra.weight")


def test_shape_mismatch(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def reshape(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"] = torch.ones(33)

    broken = variant(tmp_path, experts[0], "shape", rewrite_tensors(reshape))
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [broken]), "model.norm.weight", "shape", "[33]", "[32]")


def test_dtype_mismatch(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def to_half(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"].half()

    broken = variant(tmp_path, experts[0], "dtype", rewrite_tensors(to_half))
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [broken]), "model.layers.0.self_attn.q_proj.weight", "F16", "F32")


def test_different_architectures(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def rename(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = ["MistralForCausalLM"]
        (path / "config.json").write_text(json.dumps(config))

    other = variant(tmp_path, experts[0], "mistral", rename)
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [other]), "config.json", "MistralForCausalLM", "LlamaForCausalLM")


def test_truncated_safetensors(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def truncate(path: Path) -> None:
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) - 100])

    broken = variant(tmp_path, experts[0], "truncated", truncate)
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [broken]), "model.safetensors")


def test_header_length_past_end_of_file(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def lie(path: Path) -> None:
        data = bytearray((path / "model.safetensors").read_bytes())
        data[:8] = struct.pack("<Q", len(data) * 10)
        (path / "model.safetensors").write_bytes(bytes(data))

    broken = variant(tmp_path, experts[0], "longheader", lie)
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [broken]), "model.safetensors", "header")


def test_offsets_past_end_of_file(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def move(path: Path) -> None:
        data = (path / "model.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        entry = header["model.norm.weight"]
        span = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [len(data), len(data) + span]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])

    broken = variant(tmp_path, experts[0], "offsets", move)
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [broken]), "model.safetensors", "model.norm.weight")


def test_header_not_json(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def garble(path: Path) -> None:
        data = bytearray((path / "model.safetensors").read_bytes())
        data[8:20] = b"not json!!!!"
        (path / "model.safetensors").write_bytes(bytes(data))

    broken = variant(tmp_path, experts[0], "garbled", garble)
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [broken]), "model.safetensors", "JSON")


def test_pickle_checkpoint_needs_opt_in(capsys, family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base, experts = family

    def to_pickle(path: Path) -> None:
        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()

    pickled = variant(tmp_path, experts[0], "pickled", to_pickle)
    expect_failure(capsys, tmp_path, gta_recipe("ties", base, [pickled]), str(pickled), "pytorch_model.bin", "--allow-pickle")

    recipe_path = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, [pickled]))
    status, message = run_cli(capsys, "merge", str(recipe_path), str(tmp_path / "allowed"), "--allow-pickle")
    assert status == 0, message
    assert (tmp_path / "allowed" / "mergefleet.json").exists()
    assert list((tmp_path / "cache" / "mergefleet" / "converted").glob("pickled-*/model.safetensors"))


def test_nan_in_merged_tensor(capsys, family, tmp_path: Path) -> None:
    base, experts = family

    def poison(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.5.mlp.down_proj.weight"][0, 0] = float("inf")

    broken = variant(tmp_path, experts[0], "inf", rewrite_tensors(poison))
    path = write_recipe(tmp_path / "recipe.yaml", gta_recipe("task_arithmetic", base, [broken]))
    out = tmp_path / "out"
    status, message = run_cli(capsys, "merge", str(path), str(out), "--shards", "2")
    assert status != 0
    assert "model.layers.5.mlp.down_proj.weight" in message and "NaN/Inf" in message
    assert not (out / "mergefleet.json").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "config.json").exists()
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_output_holding_another_merge_is_refused(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "out"
    first = write_recipe(tmp_path / "first.yaml", gta_recipe("ties", base, experts))
    assert run_cli(capsys, "merge", str(first), str(out))[0] == 0
    before = (out / "mergefleet.json").read_bytes()

    second = write_recipe(tmp_path / "second.yaml", gta_recipe("task_arithmetic", base, experts))
    status, message = run_cli(capsys, "merge", str(second), str(out))
    assert status != 0 and "different merge" in message and "--overwrite" in message
    assert (out / "mergefleet.json").read_bytes() == before

    status, message = run_cli(capsys, "merge", str(second), str(out), "--overwrite")
    assert status == 0, message
    assert json.loads((out / "mergefleet.json").read_text())["method"] == "task_arithmetic"


def test_json_output_is_one_object(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    path = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts))
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--json", "--shards", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shards"] == 2 and result["method"] == "ties" and result["tensors"] == 75
