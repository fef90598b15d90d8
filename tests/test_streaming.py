"""Huge tensors are merged from windows read on demand, with the same bytes as loaded ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import shard as shard_module
from orchestrator.methods import METHODS
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from orchestrator.storage.checkpoint import open_source, read_tensor_index
from orchestrator.streaming import StoredTensor
from tests.helpers import gta_recipe
from tests.test_pipeline import read_tensors

STREAMING = sorted(name for name, spec in METHODS.items() if spec.streams_inputs)


def test_the_element_wise_methods_stream() -> None:
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "ties_sv"} <= set(STREAMING)


def _recipe(method: str, base: Path, experts: list[Path]) -> dict:
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip([base, *experts], [1, 2, 3, 4])]}
    if method == "nearswap":
        return {"merge_method": method, "base_model": str(base), "models": [{"model": str(base)}, {"model": str(experts[0])}], "parameters": {"t": 0.01}}
    if method in ("ram", "ramplus_tl"):
        return {"merge_method": method, "base_model": str(base), "models": [{"model": str(p)} for p in [base, *experts]], "parameters": {"epsilon": 0.002}}
    return gta_recipe(method, base, experts)


CASES = [(m, None) for m in STREAMING] + [(m, "bfloat16") for m in ("ties", "breadcrumbs", "nearswap", "ram") if m in STREAMING]


@pytest.mark.parametrize("method,dtype", CASES)
def test_streamed_inputs_give_the_same_bytes(method: str, dtype: str | None, family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = family
    data = _recipe(method, base, experts)
    if dtype:  # the inputs (float32) are cast chunk by chunk as they stream in
        data["dtype"] = dtype
    recipe = parse_recipe(data)
    merge(recipe, str(tmp_path / "loaded"), shards=2)
    monkeypatch.setattr(shard_module, "EAGER_INPUT_BYTES", 0)
    monkeypatch.setattr("orchestrator.streaming.WINDOW_BYTES", 1000)
    merge(recipe, str(tmp_path / "streamed"), shards=2)
    loaded, streamed = read_tensors(tmp_path / "loaded"), read_tensors(tmp_path / "streamed")
    for name, tensor in loaded.items():
        assert torch.equal(streamed[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_stored_tensor_reads_windows_only(family) -> None:
    base, _ = family
    source = open_source(str(base))
    info = read_tensor_index(source)["model.embed_tokens.weight"]
    loaded = torch.frombuffer(bytearray(source.read_range(info.file, info.begin, info.end)), dtype=torch.float32)
    source.bytes_read = 0
    stored = StoredTensor(source, info, window_bytes=1024)
    assert stored.shape == torch.Size(info.shape) and stored.numel() == loaded.numel()
    flat = stored.reshape(-1)
    assert torch.equal(flat[10:20], loaded[10:20])
    assert source.bytes_read == 1024
    assert torch.equal(flat[100:2000], loaded[100:2000])
    assert source.bytes_read == 1024 + (2000 - 100) * 4
    with pytest.raises(NotImplementedError):
        stored[3]
