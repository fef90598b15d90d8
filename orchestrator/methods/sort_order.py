"""Which of several equal magnitudes mergekit keeps: torch's CPU sort order, reproduced.

mergekit 0.1.5 picks ties' top-k with ``torch.argsort(|τ|, descending=True)[:k]``, the
breadcrumbs band with ``torch.sort(|τ|).indices[a:b]`` and sce's top-k with ``torch.topk``.
On the CPU these run libstdc++'s ``std::sort`` (introsort) and ``std::nth_element``
(introselect), which are not stable: among entries of equal magnitude - frequent in half
precision, where |τ| has 8 or 11 significant bits - which ones land inside the kept range
depends on the whole array's partitioning history. To keep the same entries we replay that
history (``introsort``, compiled), but only along the path of ranges that contain a
boundary of the kept range (a quickselect over the same partitions): expected O(n) work
instead of a full O(n log n) sort.

The kept set is returned as value bounds plus the original indices of the kept entries
equal to a bound. Keys are numpy integers that order like the values (the bit patterns of
non-negative floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STOP_BLOCK = 512
"""Entries whose cursor stops a partition lists at once (any size gives the same order)."""


class DepthLimitReached(Exception):
    """Introsort would switch to heapsort here (its depth limit); the caller runs torch's own
    sort instead. It never happens on realistic data: partitions split near the median."""


@dataclass(frozen=True)
class SortedRange:
    """The ``size`` entries at sorted positions [start, stop) of a sort: those strictly between
    ``first`` and ``last`` (the range's extreme keys; None where the range reaches that end of
    the array) plus ``tied``, the sorted original indices of the kept entries whose key equals
    ``first`` or ``last``."""

    first: int | None
    last: int | None
    tied: np.ndarray
    size: int


def sorted_range(keys: np.ndarray, start: int, stop: int, *, descending: bool, select: bool = False) -> SortedRange:
    """The entries ``torch.sort`` (``select``: ``torch.topk``, start 0) puts at positions
    [start, stop) of ``keys`` (1-D; overwritten). Raises DepthLimitReached (see there)."""
    n = keys.size
    if stop <= start:
        return SortedRange(None, None, np.empty(0, dtype=np.int64), 0)
    if start <= 0 and stop >= n:
        return SortedRange(None, None, np.empty(0, dtype=np.int64), n)
    from orchestrator.methods import introsort  # numba compiles (or loads) on first use only

    flip = keys.dtype.type(-1 if descending else 0)
    origins = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    if select:
        done = introsort.introselect(keys, origins, stop - 1, flip, STOP_BLOCK)
    else:
        done = introsort.introsort(keys, origins, np.array([b for b in (start, stop) if 0 < b < n]), flip, STOP_BLOCK)
    if not done:
        raise DepthLimitReached
    kept = keys[start:stop]  # the kept entries, in an order only partly sorted
    extremes = (int(kept.max()), int(kept.min())) if descending else (int(kept.min()), int(kept.max()))
    first = extremes[0] if start > 0 else None
    last = extremes[1] if stop < n else None
    on_bound = np.zeros(kept.size, dtype=bool)
    for bound in {b for b in (first, last) if b is not None}:
        on_bound |= kept == bound
    return SortedRange(first, last, np.sort(origins[start:stop][on_bound]).astype(np.int64), stop - start)


def members(keys: np.ndarray, kept: SortedRange, *, descending: bool) -> np.ndarray:
    """The sorted original indices a ``SortedRange`` of ``keys`` (unmodified) stands for."""
    inside = np.full(keys.size, kept.size > 0)
    before, after = (np.greater, np.less) if descending else (np.less, np.greater)
    if kept.first is not None:
        inside &= before(kept.first, keys)
    if kept.last is not None:
        inside &= after(kept.last, keys)
    inside[kept.tied] = True
    return np.flatnonzero(inside)


def compile_replay() -> None:
    """Compile the replay for every key dtype and direction now (numba caches the machine
    code next to the module), so that no merge pays for it: ``make install`` calls this."""
    for dtype in (np.int16, np.int32):
        for descending in (True, False):
            keys = np.arange(64, dtype=dtype) % 7
            sorted_range(keys.copy(), 8, 40, descending=descending)
            sorted_range(keys.copy(), 0, 40, descending=descending, select=True)
