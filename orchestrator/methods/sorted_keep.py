"""mergekit's selections by magnitude, entry for entry, for the match-mergekit precision.

The exact top-k of ``sparsify`` breaks ties at the threshold by position; mergekit keeps the
equal entries its CPU sort happens to put first (``sort_order``). These keeps reproduce that:

- ``magnitude_keeps``: ties' ``argsort(|τ|, descending=True)[:k]``, k = max(1, int(d·n));
- ``outlier_keeps``: breadcrumbs' ``sort(|τ|).indices[b:b+k]``, k = int(d·n), b = max(0,
  n − k − int(γ·n)) (an empty band when k is 0, as mergekit's);
- ``largest_keep``: sce's ``topk(v, k)`` over a non-negative tensor.

|τ| is ranked at the precision mergekit sorts it in: float32 (``.float()``) of the values
in the compute dtype, so a half-precision τ keeps its 8 or 11 significant bits and its ties.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from orchestrator.methods.sort_order import DepthLimitReached, SortedRange, sorted_range
from orchestrator.methods.sparsify import Deltas, kept_count

_KEY_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@dataclass
class SortedKeep:
    """The entries whose |x| lies strictly between ``low`` and ``high`` (None: unbounded), plus
    the ``tied`` flat indices (sorted), which hold values equal to a bound."""

    n: int
    kept: int
    low: float | None
    high: float | None
    tied: torch.Tensor  # int64

    def apply_(self, chunk: torch.Tensor, start: int) -> None:
        """Zero, in place, the entries of ``chunk`` (= x[start:start+len]) not kept."""
        if self.kept >= self.n:
            return
        if self.kept == 0:
            chunk.zero_()
            return
        size = chunk.numel()
        first, last = torch.searchsorted(self.tied, torch.tensor([start, start + size])).tolist()
        local = self.tied[first:last] - start
        saved = chunk[local]
        if chunk.dtype == torch.float64:  # mergekit ranks float64 values as float32
            magnitude = chunk.abs().float()
            inside = torch.ones(size, dtype=torch.bool)
            if self.low is not None:
                inside &= magnitude > self.low
            if self.high is not None:
                inside &= magnitude < self.high
            chunk.mul_(inside)
        else:
            if self.low is not None:
                torch.ops.aten.hardshrink.out(chunk, self.low, out=chunk)  # |x| > low
            if self.high is not None:
                chunk.masked_fill_(chunk.abs() >= self.high, 0)
        chunk[local] = saved


def magnitude_keys(deltas: Deltas, i: int) -> torch.Tensor:
    """|τᵢ| as integers that order like the float32 values mergekit sorts (their bit patterns)."""
    key_dtype = _KEY_DTYPES.get(deltas.dtype, torch.int32)
    keys = torch.empty(deltas.n, dtype=key_dtype)
    if deltas.dtype in _KEY_DTYPES:  # |τ| straight into the keys' bytes: no buffer, no copy
        magnitudes = keys.view(deltas.dtype)
        for start, stop in deltas.chunks():
            deltas.delta(i, start, stop, magnitudes[start:stop]).abs_()
        return keys
    values = deltas.buffer()  # float64: mergekit ranks it as float32
    for start, stop in deltas.chunks():
        keys[start:stop].copy_(deltas.delta(i, start, stop, values).abs_().float().view(key_dtype))
    return keys


def _from_key(key: int | None, key_dtype: torch.dtype, value_dtype: torch.dtype) -> float | None:
    if key is None:
        return None
    return torch.tensor(key, dtype=key_dtype).view(value_dtype).item()


def range_keep(
    keys: torch.Tensor, start: int, stop: int, value_dtype: torch.dtype, *, descending: bool, select: bool = False, owned: bool = False
) -> SortedKeep:
    """The ``SortedKeep`` of the entries a sort of ``keys`` (``select``: a top-k) puts at
    positions [start, stop); ``value_dtype`` is the float dtype the keys are bits of.
    ``owned`` keys are the caller's to lose: the replay reorders them instead of a copy."""
    n = keys.numel()
    if stop - start <= 0:
        return SortedKeep(n, 0, None, None, torch.empty(0, dtype=torch.int64))
    if stop - start >= n:
        return SortedKeep(n, n, None, None, torch.empty(0, dtype=torch.int64))
    try:
        work = keys.numpy() if owned else keys.numpy().copy()
        kept = sorted_range(work, start, stop, descending=descending, select=select)
    except DepthLimitReached:
        if owned:
            raise  # the keys are reordered by now: the caller rebuilds them and asks again
        kept = _torch_range(keys, start, stop, value_dtype, descending=descending, select=select)
    bounds = (kept.last, kept.first) if descending else (kept.first, kept.last)
    low, high = (_from_key(b, keys.dtype, value_dtype) for b in bounds)
    return SortedKeep(n, stop - start, low, high, torch.from_numpy(kept.tied))


def _torch_range(keys: torch.Tensor, start: int, stop: int, value_dtype: torch.dtype, *, descending: bool, select: bool) -> SortedRange:
    """The same range from torch's own sort (or topk): only where the replay gives up."""
    values = keys.view(value_dtype).float()
    if select:
        chosen = torch.topk(values, stop).indices
    else:
        chosen = torch.sort(values, descending=descending).indices[start:stop]
    chosen_keys = keys[chosen]
    high, low = int(chosen_keys.max()), int(chosen_keys.min())
    first_key, last_key = (high, low) if descending else (low, high)
    first = first_key if start > 0 else None
    last = last_key if stop < keys.numel() else None
    on_bound = torch.zeros(chosen.numel(), dtype=torch.bool)
    for bound in (first, last):
        if bound is not None:
            on_bound |= chosen_keys == bound
    return SortedRange(first, last, np.sort(chosen[on_bound].numpy()), chosen.numel())


def _key_dtype_of(deltas: Deltas) -> torch.dtype:
    return deltas.dtype if deltas.dtype in _KEY_DTYPES else torch.float32


def _replayed(deltas: Deltas, ranges: Sequence[tuple[int, int] | None], counts: Sequence[int], *, descending: bool) -> list[SortedKeep]:
    """For each task vector i, the keep of sorted positions ``ranges[i]`` of |τᵢ| (None: keep
    ``counts[i]`` of n, all or nothing). The keys are built here one vector at a time; the
    replays run in a few threads (numpy releases the GIL), so they overlap with each other
    and with building the next keys."""
    n = deltas.n
    value_dtype = _key_dtype_of(deltas)
    results: list[SortedKeep | Future[SortedKeep]] = []
    pending: list[Future[SortedKeep]] = []
    workers = max(1, min(torch.get_num_threads(), len(ranges)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="replay") as pool:
        for i, (span, count) in enumerate(zip(ranges, counts)):
            if span is None:
                results.append(SortedKeep(n, count, None, None, torch.empty(0, dtype=torch.int64)))
                continue
            if len(pending) >= workers:
                pending.pop(0).result()
            future = pool.submit(range_keep, magnitude_keys(deltas, i), *span, value_dtype, descending=descending, owned=True)
            pending.append(future)
            results.append(future)
        keeps = []
        for i, result in enumerate(results):
            try:
                keeps.append(result.result() if isinstance(result, Future) else result)
            except DepthLimitReached:  # torch's own sort decides, on fresh keys
                keeps.append(range_keep(magnitude_keys(deltas, i), *ranges[i], value_dtype, descending=descending))
        return keeps


def magnitude_keeps(deltas: Deltas, densities: Sequence[float]) -> list[SortedKeep]:
    """ties' selection: the k = max(1, int(d·n)) entries ``argsort(|τᵢ|, descending)`` puts first."""
    counts = [kept_count(deltas.n, d) for d in densities]
    ranges = [(0, k) if 0 < k < deltas.n else None for k in counts]
    return _replayed(deltas, ranges, counts, descending=True)


def outlier_keeps(deltas: Deltas, densities: Sequence[float], gammas: Sequence[float]) -> list[SortedKeep]:
    """breadcrumbs' band: ascending positions [b, b + k) with k = int(d·n), b = max(0, n − k − int(γ·n))."""
    n = deltas.n
    ranges: list[tuple[int, int] | None] = []
    counts = []
    for density, gamma in zip(densities, gammas):
        k = n if density >= 1 else max(int(density * n), 0)
        bottom = max(0, n - k - int(gamma * n))
        counts.append(k)
        ranges.append((bottom, bottom + k) if 0 < k < n else None)
    return _replayed(deltas, ranges, counts, descending=False)


def largest_keep(values: torch.Tensor, k: int) -> SortedKeep:
    """``torch.topk(values, k)`` as a keep (values ≥ 0, 1-D, float32 or half): libstdc++'s
    nth_element, or its partial sort (a heap) when k·64 ≤ n, which torch's own topk runs."""
    n = values.numel()
    key_dtype = _KEY_DTYPES.get(values.dtype, torch.int32)
    value_dtype = values.dtype if values.dtype in _KEY_DTYPES else torch.float32
    keys = values.to(value_dtype).view(key_dtype).cpu()  # replayed on the CPU, as mergekit's CPU topk
    if 0 < k < n and k * 64 <= n:
        kept = _torch_range(keys, 0, k, value_dtype, descending=True, select=True)
        low = _from_key(kept.last, key_dtype, value_dtype)
        return SortedKeep(n, k, low, None, torch.from_numpy(kept.tied))
    return range_keep(keys, 0, k, value_dtype, descending=True, select=True)


__all__ = ["SortedKeep", "largest_keep", "magnitude_keeps", "outlier_keeps", "range_keep"]
