"""The replay of torch's CPU sort order (``sort_order``, ``sorted_keep``) against torch itself.

mergekit selects with ``torch.argsort``, ``torch.sort`` and ``torch.topk``; among equal
magnitudes the entries they keep depend on libstdc++'s introsort/introselect. The replay
must keep exactly the same entries: checked here on arrays full of equal values (small
integers, half-precision magnitudes), up to sizes where the block-wise listing of stops and
several partition levels run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.methods import sort_order
from orchestrator.methods.sort_order import members, sorted_range
from orchestrator.methods.sorted_keep import largest_keep, range_keep


@pytest.fixture(params=["large-blocks", "small-blocks"])
def blocks(request, monkeypatch):
    """A partition lists the cursors' stops a block at a time and hands over to Hoare's plain
    loop where the blocks would meet; small blocks make every case here do both, often."""
    if request.param == "small-blocks":
        monkeypatch.setattr(sort_order, "STOP_BLOCK", 4)
    return request.param


def _keys(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "few-values":
        return rng.integers(0, 5, n).astype(np.int16)
    if kind == "int32":
        return rng.integers(0, 300, n).astype(np.int32)
    values = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    return values.to(dtype).abs().view(torch.int16).numpy()


CASES = [(kind, n) for kind in ("bf16", "f16", "few-values", "int32") for n in (1, 2, 5, 17, 20, 33, 1000, 4099, 150_001)]


@pytest.mark.parametrize("kind,n", CASES)
def test_descending_top_k_is_torch_argsort(kind, n, blocks):
    keys = _keys(kind, n, seed=n)
    values = torch.from_numpy(keys.astype(np.float32))
    for k in sorted({1, max(1, n // 5), max(1, n // 2), n}):
        expected = np.sort(torch.argsort(values, descending=True)[:k].numpy())
        kept = sorted_range(keys.copy(), 0, k, descending=True)
        assert np.array_equal(members(keys, kept, descending=True), expected), (kind, n, k)


@pytest.mark.parametrize("kind,n", CASES)
def test_ascending_band_is_torch_sort(kind, n, blocks):
    keys = _keys(kind, n, seed=n + 1)
    values = torch.from_numpy(keys.astype(np.float32))
    order = torch.sort(values).indices
    for start, stop in {(n // 7, max(n // 7, n // 2)), (0, n // 3), (n // 3, n), (n // 9, n - n // 9)}:
        expected = np.sort(order[start:stop].numpy())
        kept = sorted_range(keys.copy(), start, stop, descending=False)
        assert np.array_equal(members(keys, kept, descending=False), expected), (kind, n, start, stop)


@pytest.mark.parametrize("kind,n", CASES)
def test_selection_is_torch_topk(kind, n, blocks):
    keys = _keys(kind, n, seed=n + 2)
    values = torch.from_numpy(keys.astype(np.float32))
    for k in sorted({1, max(1, n // 5), max(1, n // 2), n}):
        expected = np.sort(torch.topk(values, k).indices.numpy())
        if k * 64 > n:  # torch's nth_element path; below, its partial sort (largest_keep defers to torch)
            kept = sorted_range(keys.copy(), 0, k, descending=True, select=True)
            assert np.array_equal(members(keys, kept, descending=True), expected), (kind, n, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_keeps_apply_the_same_set_in_the_value_dtype(dtype):
    """The keep (value bounds + tied indices) zeroes exactly the entries torch's sort drops,
    applied to values of the compute dtype, also when applied chunk by chunk."""
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(70_000, generator=g) * 0.01).to(dtype).abs()
    key_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    keys = values.view(key_dtype)
    k = 70_000 // 5
    keep = range_keep(keys, 0, k, dtype, descending=True)
    expected = np.sort(torch.argsort(values.float(), descending=True)[:k].numpy())
    chunked = values.clone()
    for start in range(0, chunked.numel(), 9_999):
        keep.apply_(chunked[start : start + 9_999], start)
    assert np.array_equal(np.flatnonzero(chunked.float().numpy() != 0), expected)
    band = range_keep(keys, 7_000, 40_000, dtype, descending=False)
    expected_band = np.sort(torch.sort(values.float()).indices[7_000:40_000].numpy())
    whole = values.clone()
    band.apply_(whole, 0)
    assert np.array_equal(np.flatnonzero(whole.float().numpy() != 0), expected_band)


def test_largest_keep_uses_torch_topk_order_for_both_of_its_paths():
    g = torch.Generator().manual_seed(5)
    values = (torch.randn(20_000, generator=g) * 0.01).to(torch.bfloat16).abs()
    for k in (100, 5_000):  # 100·64 ≤ n: torch's partial sort; 5000: its nth_element
        expected = np.sort(torch.topk(values.float(), k).indices.numpy())
        chosen = values.clone()
        largest_keep(values, k).apply_(chosen, 0)
        assert np.array_equal(np.flatnonzero(chosen.float().numpy() != 0), expected), k


def test_falls_back_to_torch_when_the_depth_limit_is_reached(monkeypatch):
    """Introsort would switch to heapsort past its depth limit; the replay hands over to
    torch's own sort there, which gives the same set by definition."""

    def refuse(*args, **kwargs):
        raise sort_order.DepthLimitReached

    keys = torch.from_numpy(_keys("bf16", 5_000, seed=9))
    k = 1_000
    replayed = range_keep(keys, 0, k, torch.bfloat16, descending=True)
    monkeypatch.setattr("orchestrator.methods.sorted_keep.sorted_range", refuse)
    fallback = range_keep(keys, 0, k, torch.bfloat16, descending=True)
    assert (replayed.low, replayed.high) == (fallback.low, fallback.high)
    assert torch.equal(replayed.tied, fallback.tied) and replayed.tied.numel() > 0


def test_replays_that_reach_the_depth_limit_fall_back_for_whole_keeps(monkeypatch):
    """magnitude_keeps hands the replay its own keys (no copy); when the replay gives up, the
    keys are rebuilt and torch's sort decides: the same keep either way."""
    from orchestrator.methods.sorted_keep import magnitude_keeps
    from orchestrator.methods.sparsify import Deltas

    g = torch.Generator().manual_seed(8)
    base = (torch.randn(300, 200, generator=g) * 0.02).bfloat16()
    experts = [(base.float() + torch.randn(300, 200, generator=g) * 0.002).bfloat16() for _ in range(2)]
    deltas = Deltas(experts, base, dtype=torch.bfloat16)
    replayed = magnitude_keeps(deltas, [0.3, 0.6])

    def refuse(*args, **kwargs):
        raise sort_order.DepthLimitReached

    monkeypatch.setattr("orchestrator.methods.sorted_keep.sorted_range", refuse)
    fallback = magnitude_keeps(deltas, [0.3, 0.6])
    for a, b in zip(replayed, fallback):
        assert (a.kept, a.low, a.high) == (b.kept, b.low, b.high) and torch.equal(a.tied, b.tied) and a.tied.numel() > 0


@pytest.mark.parametrize("block", [1, 2, 8])
def test_cursors_crossing_at_block_edges(monkeypatch, block):
    """Tiny blocks put many crossings on or next to a block's edge."""
    monkeypatch.setattr(sort_order, "STOP_BLOCK", block)
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(40, 3000))
        keys = rng.integers(0, int(rng.integers(2, 40)), n).astype(np.int16)
        values = torch.from_numpy(keys.astype(np.float32))
        k = int(rng.integers(1, n))
        expected = np.sort(torch.argsort(values, descending=True)[:k].numpy())
        kept = sorted_range(keys.copy(), 0, k, descending=True)
        assert np.array_equal(members(keys, kept, descending=True), expected), (trial, n, k)
