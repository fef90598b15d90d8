"""Huge tensors are merged from windows read on demand, with the same bytes as loaded ones.

The streaming threshold and window are a ``StreamingPolicy`` the shard runner passes to
every shard; here both are set tiny, so every tensor of the tiny family streams.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.methods import METHODS, rank_sparsify, sparsify
from orchestrator.pipeline import merge
from orchestrator.receipt import Receipt
from orchestrator.recipe import parse_recipe
from orchestrator.runners.processes import WorkerProcesses
from orchestrator.storage.checkpoint import open_source, read_tensor_index
from orchestrator.streaming import StoredTensor, StreamingPolicy
from tests.helpers import gta_recipe, read_tensors

STREAMING = sorted(name for name, spec in METHODS.items() if spec.streams_inputs)
TINY_WINDOWS = StreamingPolicy(threshold_bytes=0, window_bytes=1000)


def recipe_for(method: str, base: Path, experts: list[Path], dtype: str | None = None):
    """A recipe for ``method`` over the tiny family; ``dtype`` casts the float32 inputs as they stream in."""
    if method == "linear":
        data = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip([base, *experts], [1, 2, 3, 4])]}
    elif method == "nearswap":
        data = {"merge_method": method, "base_model": str(base), "models": [{"model": str(base)}, {"model": str(experts[0])}], "parameters": {"t": 0.01}}
    elif method in ("ram", "ramplus_tl"):
        data = {"merge_method": method, "base_model": str(base), "models": [{"model": str(p)} for p in [base, *experts]], "parameters": {"epsilon": 0.002}}
    else:
        data = gta_recipe(method, base, experts)
    if dtype:
        data["dtype"] = dtype
    return parse_recipe(data)


def receipts(out: Path, shards: int) -> list[Receipt]:
    return [Receipt.model_validate_json((out / f".mergefleet/shard-{i}.json").read_text()) for i in range(shards)]


def assert_same_bytes(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_the_element_wise_methods_stream() -> None:
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "ties_sv"} <= set(STREAMING)


CASES = [(m, None) for m in STREAMING] + [(m, "bfloat16") for m in ("ties", "breadcrumbs", "nearswap", "ram") if m in STREAMING]


@pytest.fixture
def window_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The tensors read through a StoredTensor window, once per window; and those loaded whole."""
    windows: list[str] = []
    wholes: list[str] = []
    load_window, load_whole = StoredTensor._load, StoredTensor.to

    def counted_window(self: StoredTensor, start: int, stop: int) -> None:
        windows.append(self.info.name)
        load_window(self, start, stop)

    def counted_whole(self: StoredTensor, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:
        wholes.append(self.info.name)
        return load_whole(self, dtype, copy)

    monkeypatch.setattr(StoredTensor, "_load", counted_window)
    monkeypatch.setattr(StoredTensor, "to", counted_whole)
    return windows, wholes


@pytest.mark.parametrize("method,dtype", CASES)
def test_streamed_inputs_give_the_same_bytes(method: str, dtype: str | None, family, tmp_path: Path, window_reads) -> None:
    """Every tensor is read through windows, none loaded whole, and the bytes are the loaded merge's."""
    base, experts = family
    recipe = recipe_for(method, base, experts, dtype)
    merge(recipe, str(tmp_path / "loaded"), shards=2)
    assert all(r.tensors_streamed == 0 for r in receipts(tmp_path / "loaded", 2))  # the default threshold: 2 GiB
    windows, wholes = window_reads
    assert not windows

    merge(recipe, str(tmp_path / "streamed"), shards=2, runner=WorkerProcesses(streaming=TINY_WINDOWS))
    loaded, streamed = read_tensors(tmp_path / "loaded"), read_tensors(tmp_path / "streamed")
    assert sum(r.tensors_streamed for r in receipts(tmp_path / "streamed", 2)) == len(loaded)
    assert set(windows) == set(loaded) and not wholes
    assert_same_bytes(streamed, loaded)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_a_tensor_streams_through_many_windows(method: str, family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window_reads) -> None:
    """With the methods taking chunks of 64 elements (or blocks of 8 rows), each input of a
    tensor is read in many 1000-byte windows, and the bytes are still the loaded merge's."""
    base, experts = family
    recipe = recipe_for(method, base, experts)
    monkeypatch.setattr(sparsify, "CHUNK", 64)
    monkeypatch.setattr(rank_sparsify, "DELLA_BLOCK", 64)
    merge(recipe, str(tmp_path / "loaded"), shards=1)
    merge(recipe, str(tmp_path / "streamed"), shards=1, runner=WorkerProcesses(streaming=TINY_WINDOWS))
    windows, wholes = window_reads
    embedding = read_tensors(tmp_path / "loaded")["model.embed_tokens.weight"]  # 12 KB in each input
    assert windows.count("model.embed_tokens.weight") >= 10 * len(recipe.model_refs()) and not wholes
    assert_same_bytes(read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "loaded"))
    assert embedding.numel() * embedding.element_size() > 10 * TINY_WINDOWS.window_bytes


def test_the_streaming_policy_reaches_worker_processes(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = recipe_for("ties", base, experts)
    merge(recipe, str(tmp_path / "loaded"), shards=3)
    merge(recipe, str(tmp_path / "streamed"), shards=3, runner=WorkerProcesses(workers=2, streaming=TINY_WINDOWS))
    loaded = read_tensors(tmp_path / "loaded")
    assert [r.tensors_streamed for r in receipts(tmp_path / "streamed", 3)] == [len(r.tensors) for r in receipts(tmp_path / "loaded", 3)]
    assert_same_bytes(read_tensors(tmp_path / "streamed"), loaded)


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
