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
end in an insertion sort, which is stable. The last levels usually hold nothing but entries
equal to a bound; there the step has a closed form (pivot from the middle, the rest reversed).

The kept set is returned as value bounds plus the original indices of the kept entries equal
to a bound. The bounds (the keys at the range's ends) are order statistics, known before
the replay (one histogram in half precision); only the entries equal to them are followed
through the swaps, so nothing the size of the array is allocated but the two comparison
masks of a window. Swaps are written only on the side of a partition that is partitioned
again, the one holding a boundary of the kept range (the other is never read again). Keys
are numpy integers that order like the values (the bit patterns of non-negative floats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

SORT_BLOCK = 16
"""libstdc++'s ``_S_threshold``: introsort leaves ranges this small to the insertion sort."""

SELECT_BLOCK = 3
"""``__introselect`` stops partitioning at ranges this small."""



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
    first = _key_at(keys, start, descending) if start > 0 else None
    last = _key_at(keys, stop - 1, descending) if stop < n else None
    bounds = [b for b in (first, last) if b is not None]
    if not bounds:
        return SortedRange(None, None, np.empty(0, dtype=np.int64), n)
    replay = _Replay(keys, descending, bounds)
    if select:
        replay.introselect(stop - 1)
    else:
        replay.introsort([b for b in (start, stop) if 0 < b < n])
    kept = (replay.positions >= start) & (replay.positions < stop)
    return SortedRange(first, last, np.sort(replay.origins[kept]).astype(np.int64), stop - start)


def _key_at(keys: np.ndarray, position: int, descending: bool) -> int:
    """The key a full sort puts at ``position`` (the order statistic: ties do not matter)."""
    rank = keys.size - 1 - position if descending else position  # ascending rank
    if keys.dtype == np.int16 and int(keys.min()) >= 0:  # half precision: one histogram (torch's: no widened copy)
        counts = torch.bincount(torch.from_numpy(keys), minlength=1 << 15).cumsum(0)
        return int(torch.searchsorted(counts, torch.tensor([rank + 1])))
    return int(np.partition(keys, rank)[rank])


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
    [start, stop). Only the entries whose key equals a bound of the range are followed
    (``positions``: where each is now, ``origins``: where it began): the others are inside
    or outside the range by their value alone."""

    def __init__(self, keys: np.ndarray, descending: bool, bounds: list[int]):
        self.keys = keys
        self.descending = descending
        self.bounds = bounds
        self.depth_limit = 2 * (keys.size.bit_length() - 1)
        window = _Stops.WINDOW
        self.origins = np.concatenate(
            [np.flatnonzero(self._is_bound(keys[a : a + window])) + a for a in range(0, keys.size, window)] or [np.empty(0, np.intp)]
        )
        self.positions = self.origins.copy()  # kept sorted
        self.boundaries: list[int] = []  # introsort: what a range must hold to be partitioned again
        self.nth: int | None = None  # introselect: the same

    def _is_bound(self, values: np.ndarray) -> np.ndarray:
        hit = values == self.bounds[0]
        for bound in self.bounds[1:]:
            hit |= values == bound
        return hit

    def _move(self, first: int, last: int, sources: np.ndarray, targets: np.ndarray) -> None:
        """The followed entries at ``sources`` (positions in [first, last) before this step) go
        to ``targets``; only the followed entries of that range are touched and re-sorted."""
        low, high = np.searchsorted(self.positions, [first, last])
        if low == high or sources.size == 0:
            return
        positions = self.positions[low:high]
        positions[np.searchsorted(positions, sources)] = targets
        order = np.argsort(positions, kind="stable")  # nearly sorted after a pivot or block move
        self.positions[low:high] = positions[order]
        self.origins[low:high] = self.origins[low:high][order]

    def _followed(self, first: int, last: int) -> np.ndarray:
        low, high = np.searchsorted(self.positions, [first, last])
        return self.positions[low:high]

    def introsort(self, boundaries: list[int]) -> None:
        """``std::sort``'s ``__introsort_loop`` + final insertion sort, on ranges holding a boundary."""
        self.boundaries = boundaries
        pending = [(0, self.keys.size, self.depth_limit)]
        while pending:
            first, last, depth = pending.pop()
            while self._sorted_again(first, last):
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
        self.nth = nth
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

    def _sorted_again(self, first: int, last: int) -> bool:
        """Whether the replay reads [first, last) again (partitions or block-sorts it): it
        holds a boundary of the kept range (a selection: the nth position). The keys of
        other ranges are never looked at again, so a partition leaves them unwritten."""
        if self.nth is not None:
            return first <= self.nth < last
        return any(first < b < last for b in self.boundaries)

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
        """One ``__unguarded_partition_pivot`` on [first, last), in place; returns the cut.

        Two passes over windows of the range, so no temporary grows with it: the first
        counts the cursors' stops per window and finds where the cursors cross (how many
        pairs are swapped, and the cut); the second lists the stops window by window - left
        stops from the front, right stops from the back - and swaps them pair by pair."""
        if self._all_followed_and_equal(first, last):
            return self._partition_equal(first, last)
        keys = self.keys
        pivot = self._median_to_first(first, last)
        keys[first], keys[pivot] = keys[pivot], keys[first]
        self._move(first, last, *self._followed_of(first, last, np.array([first, pivot]), np.array([pivot, first])))
        stops = _Stops(keys[first + 1 : last], keys[first], self.descending)
        swaps, cut = stops.crossing()
        cut += first + 1
        write_left, write_right = self._sorted_again(first, cut), self._sorted_again(cut, last)
        segment = keys[first + 1 : last]
        p = int(keys[first])
        # a bound can be among the left stops only if it does not precede the pivot, and so on
        check_left = any(not _precedes(b, p, self.descending) for b in self.bounds)
        check_right = any(not _precedes(p, b, self.descending) for b in self.bounds)
        sources, targets = [], []
        for left_at, left, right_at, right in stops.pairs(swaps):
            on_left_side, on_right_side = segment[left_at:], segment[right_at:]
            on_left = on_left_side.take(left, mode="clip") if write_right or check_left else None
            on_right = on_right_side.take(right, mode="clip") if write_left or check_right else None
            if check_left:  # followed entries at left stops go to their right stops
                hit = np.flatnonzero(self._is_bound(on_left))
                sources.append(left.take(hit) + left_at)
                targets.append(right.take(hit) + right_at)
            if check_right:  # and those at right stops to their left stops
                hit = np.flatnonzero(self._is_bound(on_right))
                sources.append(right.take(hit) + right_at)
                targets.append(left.take(hit) + left_at)
            if write_left:
                on_left_side[left] = on_right
            if write_right:
                on_right_side[right] = on_left
        if sources:
            self._move(first, last, np.concatenate(sources) + (first + 1), np.concatenate(targets) + (first + 1))
        return cut

    def _all_followed_and_equal(self, first: int, last: int) -> bool:
        """Whether every entry of [first, last) is followed and all have one key (the last
        levels of a replay usually: the range holds nothing but the entries tied at a bound)."""
        low, high = np.searchsorted(self.positions, [first, last])
        if high - low != last - first:
            return False
        keys = self.keys[first:last]
        return bool((keys == keys[0]).all())

    def _partition_equal(self, first: int, last: int) -> int:
        """``_partition`` of a range of equal keys, all followed: the median of three is the
        middle entry, and both cursors stop everywhere, so the pairs swapped reverse the
        range after the pivot and the cut is its middle. The keys stay as they are; the
        followed entries (here every position) only change their origins."""
        low = int(np.searchsorted(self.positions, first))
        origins = self.origins[low : low + last - first]  # positions here are first, first+1, ...
        mid = (last - first) // 2
        origins[0], origins[mid] = origins[mid], origins[0]
        origins[1:] = origins[1:][::-1].copy()
        return first + 1 + (last - first - 1) // 2

    def _followed_of(self, first: int, last: int, sources: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (source, target) moves among these (in [first, last)) that carry a followed entry."""
        followed = self._followed(first, last)
        if followed.size == 0:
            return sources[:0], targets[:0]
        at = np.minimum(np.searchsorted(followed, sources), followed.size - 1)
        hit = followed[at] == sources
        return sources[hit], targets[hit]

    def _block_sort(self, first: int, last: int) -> None:
        """The final insertion sort of a small range: a stable sort."""
        block = self.keys[first:last]
        order = np.argsort(-block.astype(np.int64) if self.descending else block, kind="stable")
        self.keys[first:last] = block[order]
        self._move(first, last, *self._followed_of(first, last, order + first, np.arange(first, last)))


def _precedes(a: int, b: int, descending: bool) -> bool:
    return a > b if descending else a < b


class _Stops:
    """Where the two cursors of a Hoare partition stop on ``segment`` (the range after the
    pivot), window by window: the left cursor at entries that do not precede the pivot, the
    right cursor at entries the pivot does not precede (in the sort's order). The stops of
    the window where the cursors cross are listed once and kept for ``pairs``."""

    WINDOW = 1 << 18

    def __init__(self, segment: np.ndarray, pivot: Any, descending: bool):
        self.segment, self.pivot, self.descending = segment, pivot, descending
        edges = list(range(0, segment.size, self.WINDOW)) + [segment.size]
        self.spans = list(zip(edges[:-1], edges[1:]))
        self.listed: dict[tuple[str, int], np.ndarray] = {}  # (side, window): stops in it, from its start

    def left(self, a: int, b: int) -> np.ndarray:
        part = self.segment[a:b]
        return part <= self.pivot if self.descending else part >= self.pivot

    def right(self, a: int, b: int) -> np.ndarray:
        part = self.segment[a:b]
        return part >= self.pivot if self.descending else part <= self.pivot

    def _stops(self, side: str, window: int) -> np.ndarray:
        """Positions (from the window's start) of one cursor's stops in a window."""
        listed = self.listed.get((side, window))
        if listed is None:
            a, b = self.spans[window]
            listed = np.flatnonzero(self.left(a, b) if side == "left" else self.right(a, b))
        return listed

    def crossing(self) -> tuple[int, int]:
        """(pairs swapped, cut relative to the segment): the j-th left stop pairs with the
        j-th right stop from the right while it lies left of it; the cut is where the left
        cursor then stops - its next stop, or the last right stop swapped, if nearer.

        Every pair before the window where the cursors cross is swapped; inside it, pair q
        is swapped while its left stop lies left of its right stop (right stops beyond the
        window lie right of anything in it), which holds for a prefix of the pairs."""
        lefts = [int(np.count_nonzero(self.left(a, b))) for a, b in self.spans]
        rights = [int(np.count_nonzero(self.right(a, b))) for a, b in self.spans]
        before, after = 0, sum(rights)  # left stops before a window's start, right stops from it on
        window = 0
        while window < len(self.spans) and before + lefts[window] < after - rights[window]:
            before += lefts[window]
            after -= rights[window]
            window += 1
        if window == len(self.spans):  # no stops at all (an empty segment)
            return 0, self._select_left(0, lefts)
        a = self.spans[window][0]
        left_at = self.listed[("left", window)] = self._stops("left", window)
        right_at = self.listed[("right", window)] = self._stops("right", window)
        beyond = after - right_at.size  # right stops beyond this window
        low = max(0, beyond - before)  # pairs (counted from ``before``) whose right stop lies in the window
        high = min(left_at.size, after - before)
        facing = right_at[after - before - high : after - before - low][::-1]
        swaps = before + low + int(np.count_nonzero(left_at[low:high] < facing))
        local = swaps - before
        next_left = a + int(left_at[local]) if local < left_at.size else self._select_left(swaps, lefts)
        if swaps == 0:
            return swaps, next_left
        rank = swaps - 1  # the last pair's right stop, counted from the back
        last_right = a + int(right_at[after - 1 - rank]) if rank >= beyond else self._select_right(rank, rights)
        return swaps, min(next_left, last_right)

    def _select_left(self, rank: int, counts: list[int]) -> int:
        """Position of the left stop of 0-based rank ``rank`` from the front (size + 1: none)."""
        for window, ((a, _), count) in enumerate(zip(self.spans, counts)):
            if rank < count:
                return a + int(self._stops("left", window)[rank])
            rank -= count
        return self.segment.size + 1

    def _select_right(self, rank: int, counts: list[int]) -> int:
        """Position of the right stop of 0-based rank ``rank`` counted from the back."""
        for window in reversed(range(len(self.spans))):
            count = counts[window]
            if rank < count:
                return self.spans[window][0] + int(self._stops("right", window)[count - 1 - rank])
            rank -= count
        raise AssertionError("fewer right stops than pairs")

    def pairs(self, swaps: int) -> Iterator[tuple[int, np.ndarray, int, np.ndarray]]:
        """The first ``swaps`` (left stop, right stop) pairs, in batches of at most a window:
        (a, left stops from a, b, right stops from b). Stops are listed from the segment as
        it was before any swap (the crossing window's are kept from ``crossing``; other
        windows are not written before they are listed)."""
        front, back = iter(range(len(self.spans))), iter(reversed(range(len(self.spans))))
        lefts = rights = np.empty(0, dtype=np.intp)
        left_at = right_at = 0
        done = 0
        while done < swaps:
            if lefts.size == 0:
                window = next(front)
                left_at, lefts = self.spans[window][0], self._stops("left", window)
            if rights.size == 0:
                window = next(back)
                right_at, rights = self.spans[window][0], self._stops("right", window)[::-1]
            take = min(lefts.size, rights.size, swaps - done)
            if take:
                yield left_at, lefts[:take], right_at, rights[:take]
                lefts, rights = lefts[take:], rights[take:]
                done += take
