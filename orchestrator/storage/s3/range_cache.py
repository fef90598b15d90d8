"""Fetched byte ranges of S3 objects kept on local disk (``fleet.storage.cache_dir``)."""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import threading
from pathlib import Path


class RangeCache:
    """Byte ranges of one object version, kept on local disk.

    ``<dir>/<digest of bucket/key>-<etag>.data`` is a sparse file holding fetched bytes at
    their own offsets; ``.ranges`` beside it logs ``begin end`` lines, each appended only
    after its bytes are on disk, so a crash leaves a miss, never wrong bytes. A replaced
    object has another ETag, hence other files: an entry never goes stale. Several
    processes may share the directory.
    """

    def __init__(self, directory: str | os.PathLike[str], bucket: str, key: str, etag: str, size: int) -> None:
        self.directory = Path(directory).expanduser()
        digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:32]
        tag = re.sub(r"[^0-9A-Za-z-]", "_", etag)[:80]
        self._data = self.directory / f"{digest}-{tag}.data"
        self._log = self.directory / f"{digest}-{tag}.ranges"
        self._size = size
        self._spans: list[tuple[int, int]] = []  # sorted, disjoint, merged
        self._parsed = 0  # bytes of the log already read
        self._lock = threading.Lock()

    def _add(self, begin: int, end: int) -> None:
        spans = self._spans
        i = bisect.bisect_left(spans, (begin, begin))
        if i > 0 and spans[i - 1][1] >= begin:
            i -= 1
        j = i
        while j < len(spans) and spans[j][0] <= end:
            begin, end = min(begin, spans[j][0]), max(end, spans[j][1])
            j += 1
        spans[i:j] = [(begin, end)]

    def _covers(self, begin: int, end: int) -> bool:
        i = bisect.bisect_right(self._spans, (begin, self._size + 1)) - 1
        return i >= 0 and self._spans[i][0] <= begin and end <= self._spans[i][1]

    def _refresh(self) -> None:
        try:
            with open(self._log, "rb") as handle:
                handle.seek(self._parsed)
                text = handle.read()
        except FileNotFoundError:
            return
        complete = text[: text.rfind(b"\n") + 1]
        self._parsed += len(complete)
        for line in complete.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                begin, end = int(parts[0]), int(parts[1])
                if 0 <= begin < end <= self._size:
                    self._add(begin, end)

    def read_into(self, begin: int, view: memoryview) -> bool:
        """Fill ``view`` from the cache; False (a miss) unless every byte is there."""
        end = begin + len(view)
        with self._lock:
            if not self._covers(begin, end):
                self._refresh()
                if not self._covers(begin, end):
                    return False
        try:
            fd = os.open(self._data, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            total = 0
            while total < len(view):
                got = os.preadv(fd, [view[total:]], begin + total)
                if got == 0:
                    return False
                total += got
        finally:
            os.close(fd)
        return True

    def store(self, begin: int, view: memoryview) -> None:
        end = begin + len(view)
        with self._lock:
            if self._covers(begin, end):
                return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._data, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if os.fstat(fd).st_size < self._size:
                os.ftruncate(fd, self._size)
            total = 0
            while total < len(view):
                total += os.pwrite(fd, view[total:], begin + total)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with open(self._log, "ab") as handle:
            handle.write(f"{begin} {end}\n".encode())
        with self._lock:
            self._add(begin, end)
