"""libstdc++'s introsort and introselect, compiled (numba), carrying each entry's origin.

``sort_order`` replays torch's CPU sort with these. They are ``std::sort`` and
``std::nth_element`` step for step - the same pivots, the same swaps - except that a range
holding no boundary of the kept range is left as it is, since nothing read later depends on
its order. Each key moves together with its original index (``origins``).

A partition lists its cursors' stops a block at a time, without branches, and swaps them
in pairs: the j-th left stop with the j-th right stop counted from the right, which is the
pair Hoare's loop swaps, as long as the two blocks do not overlap. Where they would, the
plain loop takes over from the last swapped pair, so the cut is Hoare's too.

Keys are integers. ``flip`` is 0 for an ascending sort and -1 for a descending one: keys
are compared as ``key ^ flip``, and ``~key`` orders the other way round.
"""

from __future__ import annotations

import numba
import numpy as np

SORT_BLOCK = 16
"""libstdc++'s ``_S_threshold``: introsort leaves ranges this small to the insertion sort."""

SELECT_BLOCK = 3
"""``__introselect`` stops partitioning at ranges this small."""

_STACK = 130
"""Ranges introsort keeps to partition later: one per level, at most the depth limit (2·63)."""

_jit = numba.njit(cache=True, nogil=True)


@_jit
def depth_limit(n):  # type: ignore[no-untyped-def]
    """``__lg(n) * 2``: past this many levels introsort turns to heapsort."""
    levels = 0
    while n > 1:
        n >>= 1
        levels += 1
    return 2 * levels


@_jit
def _swap(keys, origins, a, b):  # type: ignore[no-untyped-def]
    keys[a], keys[b] = keys[b], keys[a]
    origins[a], origins[b] = origins[b], origins[a]


@_jit
def _median_to_first(keys, origins, first, last, flip):  # type: ignore[no-untyped-def]
    """``__move_median_to_first(first, first + 1, mid, last - 1)``."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    ka, kb, kc = keys[a] ^ flip, keys[b] ^ flip, keys[c] ^ flip
    if ka < kb:
        if kb < kc:
            median = b
        elif ka < kc:
            median = c
        else:
            median = a
    elif ka < kc:
        median = a
    elif kb < kc:
        median = c
    else:
        median = b
    _swap(keys, origins, first, median)


@_jit
def partition(keys, origins, first, last, flip, block):  # type: ignore[no-untyped-def]
    """``__unguarded_partition_pivot`` on [first, last), in place; returns the cut."""
    _median_to_first(keys, origins, first, last, flip)
    pivot = keys[first] ^ flip
    # A block is read through a view (the right one reversed) and its stops are unsigned
    # offsets into it, so no index needs numba's check for a negative one (a third faster).
    left_stops = np.empty(block, np.uint32)
    right_stops = np.empty(block, np.uint32)
    left_keys = right_keys = keys[first:first]
    left_origins = right_origins = origins[first:first]
    i, j = first + 1, last  # Hoare's cursors after the last swap
    unread_from, unread_to = first + 1, last - 1  # entries no block has listed yet
    left_block = right_block = 0
    lefts = used_lefts = rights = used_rights = 0
    while True:
        if used_lefts == lefts:
            if unread_to - unread_from + 1 < 2 * block:
                break
            left_block, lefts, used_lefts = unread_from, 0, 0
            left_keys = keys[left_block : left_block + block]
            left_origins = origins[left_block : left_block + block]
            for t in range(block):  # the left cursor stops where the key does not precede the pivot
                left_stops[lefts] = t
                lefts += (left_keys[t] ^ flip) >= pivot
            unread_from += block
        if used_rights == rights:
            if unread_to - unread_from + 1 < block:
                break
            right_block, rights, used_rights = unread_to, 0, 0
            right_keys = keys[right_block - block + 1 : right_block + 1][::-1]
            right_origins = origins[right_block - block + 1 : right_block + 1][::-1]
            for t in range(block):  # the right cursor where the pivot does not precede the key
                right_stops[rights] = t
                rights += (right_keys[t] ^ flip) <= pivot
            unread_to -= block
        pairs = min(lefts - used_lefts, rights - used_rights)
        for q in range(pairs):
            a, b = left_stops[used_lefts + q], right_stops[used_rights + q]
            left_keys[a], right_keys[b] = right_keys[b], left_keys[a]
            left_origins[a], right_origins[b] = right_origins[b], left_origins[a]
        if pairs:
            used_lefts += pairs
            used_rights += pairs
            i = left_block + np.int64(left_stops[used_lefts - 1]) + 1
            j = right_block - np.int64(right_stops[used_rights - 1])
    while True:
        while (keys[i] ^ flip) < pivot:
            i += 1
        j -= 1
        while pivot < (keys[j] ^ flip):
            j -= 1
        if not i < j:
            return i
        _swap(keys, origins, i, j)
        i += 1


@_jit
def insertion_sort(keys, origins, first, last, flip):  # type: ignore[no-untyped-def]
    """``__insertion_sort`` of [first, last): stable."""
    for i in range(first + 1, last):
        key, origin = keys[i], origins[i]
        j = i
        while j > first and (key ^ flip) < (keys[j - 1] ^ flip):
            keys[j], origins[j] = keys[j - 1], origins[j - 1]
            j -= 1
        keys[j], origins[j] = key, origin


@_jit
def introsort(keys, origins, boundaries, flip, block):  # type: ignore[no-untyped-def]
    """``std::sort`` of ``keys`` on the ranges holding a position of ``boundaries`` (the
    entries before and after it are in their sorted places then). False where introsort
    would turn to heapsort (its depth limit)."""
    ranges = np.empty((_STACK, 3), np.int64)
    ranges[0, 0], ranges[0, 1], ranges[0, 2] = 0, keys.size, depth_limit(keys.size)
    pending = 1
    while pending:
        pending -= 1
        first, last, depth = ranges[pending, 0], ranges[pending, 1], ranges[pending, 2]
        while True:
            holds = False
            for b in boundaries:
                holds |= first < b < last
            if not holds:
                break
            if last - first <= SORT_BLOCK:
                insertion_sort(keys, origins, first, last, flip)
                break
            if depth == 0:
                return False
            depth -= 1
            cut = partition(keys, origins, first, last, flip, block)
            ranges[pending, 0], ranges[pending, 1], ranges[pending, 2] = cut, last, depth
            pending += 1
            last = cut
    return True


@_jit
def introselect(keys, origins, nth, flip, block):  # type: ignore[no-untyped-def]
    """``std::nth_element(nth)``: False where it would turn to heap selection."""
    first, last, depth = 0, keys.size, depth_limit(keys.size)
    while last - first > SELECT_BLOCK:
        if depth == 0:
            return False
        depth -= 1
        cut = partition(keys, origins, first, last, flip, block)
        if cut <= nth:
            first = cut
        else:
            last = cut
    insertion_sort(keys, origins, first, last, flip)
    return True
