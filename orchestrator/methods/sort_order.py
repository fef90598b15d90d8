"""Which of several equal magnitudes mergekit keeps: torch's CPU sort order, reproduced.

mergekit 0.1.5 picks ties' top-k with ``torch.argsort(|τ|, descending=True)[:k]``, the
breadcrumbs band with ``torch.sort(|τ|).indices[a:b]`` and sce's top-k with ``torch.topk``.
On the CPU these run libstdc++'s ``std::sort`` (introsort) and ``std::nth_element``
(introselect), which are not stable: among entries of equal magnitude - frequent in half
precision, where |τ| has 8 or 11 significant bits - which ones land inside the kept range
depends on the whole array's partitioning history. To keep the same entries we replay that
history, but only along the path of ranges that contain a boundary of the kept range (a
quickselect over the same partitions): expected O(n) work instead of a full O(n log n) sort.

One partition step, exactly as libstdc++ does it (``__unguarded_partition_pivot``): the
median of elements 1, mid and last−1 (``__move_median_to_first``) is swapped to the front;
then a left cursor stops at every element that does not precede the pivot and a right
cursor at every element the pivot does not precede, and stopped pairs are swapped until the
cursors cross. The j-th left stop is swapped with the j-th right stop (counted from the
right) as long as it lies left of it, so the whole step is two masks, their stop positions
(``flatnonzero``) and one vectorised swap. Ranges of at most 16 elements (3 for a selection)
end in an insertion sort, which is stable.

The kept set is returned as value bounds plus the original indices of the kept entries equal
to a bound: an index array travels with the keys through the swaps (made at the first
partition, over the part that matters). Swaps are written only on the sides of a partition
that overlap the kept range (the others never matter). Keys are numpy integers that order
like the magnitudes (the bit patterns of non-negative floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SORT_BLOCK = 16
"""libstdc++'s ``_S_threshold``: introsort leaves ranges this small to the insertion sort."""

SELECT_BLOCK = 3
"""``__introselect`` stops partitioning at ranges this small."""

_COUNT_BLOCK = 1 << 15


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
    replay = _Replay(keys, start, stop, descending)
    boundaries = [b for b in (start, stop) if 0 < b < n]
    if boundaries and select:
        replay.introselect(stop - 1)
    elif boundaries:
        replay.introsort(boundaries)
    kept = keys[start:stop]
    if kept.size == 0:
        return SortedRange(None, None, np.empty(0, dtype=np.int64), 0)
    high, low = int(kept.max()), int(kept.min())
    first_key, last_key = (high, low) if descending else (low, high)
    first = first_key if start > 0 else None
    last = last_key if stop < n else None
    tied = np.zeros(kept.size, dtype=bool)
    for bound in (first, last):
        if bound is not None:
            tied |= kept == bound
    return SortedRange(first, last, np.sort(replay.original(start, stop)[tied]).astype(np.int64), kept.size)


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


class _Replay:
    """libstdc++'s partitioning of ``keys``, restricted to what decides the kept range
    [start, stop). ``index`` (each position's original index) moves alongside; it is made at
    the first partition, and only over the sides that overlap the kept range."""

    def __init__(self, keys: np.ndarray, start: int, stop: int, descending: bool):
        self.keys = keys
        self.start, self.stop = start, stop
        self.descending = descending
        self.depth_limit = 2 * (keys.size.bit_length() - 1)
        self.index: np.ndarray | None = None  # original index of positions offset.. offset + len
        self.offset = 0
        self._index_dtype = np.int32 if keys.size < 2**31 else np.int64

    def original(self, first: int, last: int) -> np.ndarray:
        """The original indices of the entries now at positions [first, last)."""
        if self.index is None:
            return np.arange(first, last, dtype=self._index_dtype)
        return self.index[first - self.offset : last - self.offset]

    def _own_index(self, first: int, last: int) -> np.ndarray:
        if self.index is None:
            self.index, self.offset = np.arange(first, last, dtype=self._index_dtype), first
        return self.index[first - self.offset : last - self.offset]

    def introsort(self, boundaries: list[int]) -> None:
        """``std::sort``'s ``__introsort_loop`` + final insertion sort, on ranges holding a boundary."""
        pending = [(0, self.keys.size, self.depth_limit)]
        while pending:
            first, last, depth = pending.pop()
            while any(first < b < last for b in boundaries):
                if last - first <= SORT_BLOCK:
                    self._block_sort(first, last)
                    break
                if depth == 0:
                    raise DepthLimitReached
                depth -= 1
                cut = self._partition(first, last)
                pending.append((cut, last, depth))
                last = cut

    def introselect(self, nth: int) -> None:
        """``std::nth_element``'s ``__introselect``."""
        first, last, depth = 0, self.keys.size, self.depth_limit
        while last - first > SELECT_BLOCK:
            if depth == 0:
                raise DepthLimitReached
            depth -= 1
            cut = self._partition(first, last)
            if cut <= nth:
                first = cut
            else:
                last = cut
        self._block_sort(first, last)

    def _overlaps(self, first: int, last: int) -> bool:
        return first < self.stop and self.start < last

    def _median_to_first(self, first: int, last: int) -> int:
        """The position ``__move_median_to_first(first, first+1, mid, last-1)`` swaps to ``first``."""
        keys, descending = self.keys, self.descending
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        ka, kb, kc = int(keys[a]), int(keys[b]), int(keys[c])
        if _precedes(ka, kb, descending):
            if _precedes(kb, kc, descending):
                return b
            return c if _precedes(ka, kc, descending) else a
        if _precedes(ka, kc, descending):
            return a
        return c if _precedes(kb, kc, descending) else b

    def _partition(self, first: int, last: int) -> int:
        """One ``__unguarded_partition_pivot`` on [first, last), in place; returns the cut."""
        keys = self.keys
        pivot = self._median_to_first(first, last)
        keys[first], keys[pivot] = keys[pivot], keys[first]
        p = keys[first]
        segment = keys[first + 1 : last]
        size = segment.size
        # the left cursor stops where the pivot does not come after; the right, where it does not come before
        stops_left = segment <= p if self.descending else segment >= p
        stops_right = segment >= p if self.descending else segment <= p
        low, high = _crossing_window(stops_left, stops_right)
        lefts = np.flatnonzero(stops_left[:high])
        rights = np.flatnonzero(stops_right[low:])
        rights += low
        rights = rights[::-1]
        swaps = _pairs_before_crossing(lefts, rights)
        if swaps < lefts.size:
            next_left = int(lefts[swaps])
        else:
            more = np.flatnonzero(stops_left[high:])
            next_left = int(more[0]) + high if more.size else size + 1
        cut = (next_left if swaps == 0 else min(next_left, int(rights[swaps - 1]))) + first + 1
        left, right = lefts[:swaps], rights[:swaps]
        write_left, write_right = self._overlaps(first, cut), self._overlaps(cut, last)
        _swap(segment, left, right, write_left, write_right)
        if self.index is None:  # the first partition: index the sides that matter, from identity
            low, high = (first if write_left else cut), (last if write_right else cut)
            self.index, self.offset = np.arange(low, high, dtype=self._index_dtype), low
            for position, source in ((first, pivot), (pivot, first)):  # the median's swap
                if low <= position < high:
                    self.index[position - low] = source
            shift = first + 1

            def holding(positions: np.ndarray) -> np.ndarray:  # what those positions hold after the median's swap
                return np.where(positions == pivot - shift, first, positions + shift)

            if write_left:
                self.index[left + (shift - low)] = holding(right)
            if write_right:
                self.index[right + (shift - low)] = holding(left)
        else:
            index = self.index
            a, b = first - self.offset, pivot - self.offset
            index[a], index[b] = index[b], index[a]
            _swap(index[first + 1 - self.offset : last - self.offset], left, right, write_left, write_right)
        return cut

    def _block_sort(self, first: int, last: int) -> None:
        """The final insertion sort of a small range: a stable sort."""
        block = self.keys[first:last]
        order = np.argsort(-block.astype(np.int64) if self.descending else block, kind="stable")
        self.keys[first:last] = block[order]
        index = self._own_index(first, last)
        index[:] = index[order]


def _swap(values: np.ndarray, left: np.ndarray, right: np.ndarray, write_left: bool, write_right: bool) -> None:
    """Swap values[left[j]] with values[right[j]], writing only the sides asked for."""
    moved = values[left] if write_right else None
    if write_left:
        values[left] = values[right]
    if write_right:
        values[right] = moved


def _precedes(a: int, b: int, descending: bool) -> bool:
    return a > b if descending else a < b


def _crossing_window(stops_left: np.ndarray, stops_right: np.ndarray) -> tuple[int, int]:
    """A window [low, high) of the segment that holds the point where the count of left stops
    before it meets the count of right stops after it (where the cursors cross), found from
    per-block counts so the stop positions are listed only on each cursor's side."""
    size = stops_left.size
    if size <= 2 * _COUNT_BLOCK:
        return 0, size
    edges = list(range(0, size, _COUNT_BLOCK)) + [size]
    spans = list(zip(edges[:-1], edges[1:]))
    left_counts = [np.count_nonzero(stops_left[a:b]) for a, b in spans]
    right_counts = [np.count_nonzero(stops_right[a:b]) for a, b in spans]
    before, after = 0, sum(right_counts)
    block = 0
    while block < len(spans) and before < after:
        before += left_counts[block]
        after -= right_counts[block]
        block += 1
    return edges[max(block - 1, 0)], edges[min(block + 1, len(edges) - 1)]


def _pairs_before_crossing(lefts: np.ndarray, rights: np.ndarray) -> int:
    """How many j have lefts[j] < rights[j] (a prefix: lefts rise, rights fall)."""
    low, high = 0, min(lefts.size, rights.size)
    while low < high:
        middle = (low + high) // 2
        if lefts[middle] < rights[middle]:
            low = middle + 1
        else:
            high = middle
    return low
