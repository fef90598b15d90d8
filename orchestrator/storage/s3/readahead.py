"""Read-ahead for a shard: the byte ranges it will read, coalesced into ranged GETs and
fetched in order ahead of the reader, within a memory budget."""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

_MAX_GAP = 256 * 1024
"""Largest hole between two wanted ranges that one request may span."""
_GAP_FRACTION = 0.02
"""Spanned holes may add at most this fraction to the bytes wanted."""


def plan_requests(
    ranges: Sequence[tuple[str, int, int]],
    *,
    max_request: int,
    max_gap: int = _MAX_GAP,
    gap_fraction: float = _GAP_FRACTION,
) -> list[tuple[str, int, int]]:
    """The ranged GETs that fetch ``ranges`` (``(file, begin, end)``, in reading order).

    Consecutive ranges of one file are coalesced when the next starts at most ``max_gap``
    bytes after the previous ends, while the holes spanned stay under ``gap_fraction``
    of the bytes wanted and a request stays under ``max_request``; a range larger than
    that is split. The requests keep the reading order, so buffers free in order.
    """
    allowance = int(gap_fraction * sum(max(0, end - begin) for _, begin, end in ranges))
    groups: list[list[Any]] = []
    for file, begin, end in ranges:
        if end <= begin:
            continue
        if groups:
            last = groups[-1]
            gap = begin - last[2]
            if last[0] == file and 0 <= gap <= min(max_gap, allowance) and end - last[1] <= max_request:
                allowance -= gap
                last[2] = end
                continue
        groups.append([file, begin, end])
    requests = []
    for file, begin, end in groups:
        for start in range(begin, end, max_request):
            requests.append((file, start, min(end, start + max_request)))
    return requests


class _Piece:
    __slots__ = ("index", "file", "begin", "end", "future", "released")

    def __init__(self, index: int, file: str, begin: int, end: int) -> None:
        self.index, self.file, self.begin, self.end = index, file, begin, end
        self.future: Future[bytearray] | None = None
        self.released = False

    @property
    def size(self) -> int:
        return self.end - self.begin


class ReadAhead:
    """Fetches planned requests ahead of the reader, in order, within a byte budget.

    ``serve`` copies a read out of the fetched pieces; a piece is freed once a read ends
    at its end. A read the plan does not cover (or covers no more: a second pass over a
    freed piece) returns False, and the caller fetches it directly.
    """

    def __init__(
        self,
        fetch: Callable[[str, int, memoryview], None],
        requests: Sequence[tuple[str, int, int]],
        *,
        budget: int,
        pool: ThreadPoolExecutor,
    ) -> None:
        self._fetch = fetch
        self._pieces = [_Piece(i, file, begin, end) for i, (file, begin, end) in enumerate(requests)]
        self._starts: dict[str, list[tuple[int, int]]] = {}
        for piece in self._pieces:
            self._starts.setdefault(piece.file, []).append((piece.begin, piece.index))
        for starts in self._starts.values():
            starts.sort()
        self._widest = max((p.size for p in self._pieces), default=0)
        self._budget = budget
        self._pool = pool
        self._next = 0  # the next piece to submit
        self._low = 0  # every piece below this one is released
        self._held = 0  # bytes of submitted, unreleased pieces
        self._lock = threading.Lock()
        with self._lock:
            self._pump()

    @property
    def held_bytes(self) -> int:
        return self._held

    def _load(self, piece: _Piece) -> bytearray:
        buffer = bytearray(piece.size)
        self._fetch(piece.file, piece.begin, memoryview(buffer))
        return buffer

    def _pump(self) -> None:
        while self._next < len(self._pieces):
            piece = self._pieces[self._next]
            if not piece.released:
                if self._held and self._held + piece.size > self._budget:
                    return
                self._held += piece.size
                piece.future = self._pool.submit(self._load, piece)
            self._next += 1

    def _release(self, piece: _Piece) -> None:
        if piece.released:
            return
        piece.released = True
        if piece.future is not None:
            piece.future.cancel()
            piece.future = None
            self._held -= piece.size
        while self._low < len(self._pieces) and self._pieces[self._low].released:
            self._low += 1

    def _find(self, file: str, begin: int) -> int | None:
        """The first unreleased piece of ``file`` that holds byte ``begin``."""
        starts = self._starts.get(file)
        if not starts:
            return None
        best = None
        i = bisect.bisect_right(starts, (begin, len(self._pieces))) - 1
        while i >= 0 and starts[i][0] + self._widest > begin:
            piece = self._pieces[starts[i][1]]
            if not piece.released and begin < piece.end and (best is None or piece.index < best):
                best = piece.index
            i -= 1
        return best

    def serve(self, file: str, begin: int, view: memoryview) -> bool:
        """Copy bytes ``begin``… of ``file`` into ``view`` from the planned pieces.

        Reads may come as whole ranges or in windows, and a window of one tensor may
        interleave with reads of the next (a streaming method): a piece not yet in flight
        is then fetched directly for this read, and every piece is freed once a read
        reaches its end.
        """
        end = begin + len(view)
        with self._lock:
            first = self._find(file, begin)
            if first is None:
                return False
            chain, position, index = [], begin, first
            while position < end:
                piece = self._pieces[index] if index < len(self._pieces) else None
                if piece is None or piece.released or piece.file != file or not piece.begin <= position < piece.end:
                    return False
                chain.append(piece)
                position, index = piece.end, index + 1
            self._pump()
        for piece in chain:
            low, high = max(begin, piece.begin), min(end, piece.end)
            with self._lock:
                future = piece.future
            try:
                data = future.result() if future is not None else None
            except CancelledError:  # freed meanwhile by a read on another thread
                data = None
            if data is None:  # not in flight (the budget is held by earlier pieces), or freed
                self._fetch(file, low, view[low - begin : high - begin])
            else:
                view[low - begin : high - begin] = memoryview(data)[low - piece.begin : high - piece.begin]
            data = future = None
            with self._lock:
                if high == piece.end:
                    self._release(piece)
                self._pump()
        return True

    def close(self) -> None:
        with self._lock:
            for piece in self._pieces[self._low :]:
                self._release(piece)
            self._next = len(self._pieces)
