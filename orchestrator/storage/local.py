"""Local-disk storage: ``LocalCheckpoint`` reads inputs, ``LocalOutput`` writes merges.

Reads are positioned reads (``os.preadv``) on one cached file descriptor per file, straight
into the caller's buffer: no mmap of whole files, so resident memory stays at what the
caller holds. Writes go to ``<name>.partial-<pid>-<host>-<random>`` beside the final name
(the name says which process writes it, so only a dead writer's are ever removed) and are
fsynced and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import threading
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Sequence

import xxhash

from orchestrator.errors import CheckpointError, OutputError, from_os_error
from orchestrator.storage.base import FileFingerprint
from orchestrator.storage.safetensors_format import header_length

log = logging.getLogger(__name__)

PARTIAL_MARK = ".partial-"
"""Infix of a file being written; such files are never listed."""

_PARTIAL_OWNER = re.compile(r"\.partial-(\d+)-(.+)-[0-9a-f]{12}$")
"""A temp file's name after its final name: ``.partial-<pid>-<host>-<random>``, its writer."""


def partial_name(name: str) -> str:
    """The temp name for writing ``name``: it carries the writing process (pid and host)."""
    return f"{name}{PARTIAL_MARK}{os.getpid()}-{socket.gethostname()}-{secrets.token_hex(6)}"


def _writer_is_dead(name: str) -> bool:
    """Whether the process that wrote temp file ``name`` is known to be gone (on this host)."""
    from orchestrator.storage.output_lock import process_alive

    owner = _PARTIAL_OWNER.search(name)
    if owner is None or owner.group(2) != socket.gethostname():
        return False  # another host's, or not named by mergefleet: not ours to judge
    return not process_alive(int(owner.group(1)))


def _relative(file: str, root: Path, error: type[Exception]) -> Path:
    """``root / file`` for a relative path that stays inside ``root``."""
    rel = PurePosixPath(file)
    if not file or rel.is_absolute() or ".." in rel.parts:
        raise error(f"{file!r} is not a relative file name inside {root}")
    return root.joinpath(*rel.parts)


def _walk(root: Path) -> list[str]:
    """Every file under ``root`` as a relative POSIX path, sorted; temp files left out."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if PARTIAL_MARK in name:
                continue
            path = Path(dirpath, name)
            if path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


class LocalCheckpoint:
    """A checkpoint directory on local disk (implements ``CheckpointSource``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path).expanduser().absolute()
        self.uri = str(self.root)
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        if not self.root.exists():
            raise CheckpointError(f"checkpoint directory {self.root} does not exist")
        if not self.root.is_dir():
            raise CheckpointError(
                f"{self.root} is a file; a checkpoint is the directory that holds "
                "config.json and the .safetensors files"
            )

    def __repr__(self) -> str:
        return f"LocalCheckpoint({self.uri!r})"

    # -- listing and metadata

    def _path(self, file: str) -> Path:
        return _relative(file, self.root, CheckpointError)

    def _stat(self, file: str) -> os.stat_result:
        try:
            return os.stat(self._path(file))
        except FileNotFoundError:
            raise CheckpointError(f"{self.root / file} does not exist") from None
        except OSError as exc:
            raise from_os_error(exc, str(self.root / file), reading_input=True) from None

    def list_files(self) -> list[str]:
        return _walk(self.root)

    def exists(self, file: str) -> bool:
        return self._path(file).is_file()

    def size(self, file: str) -> int:
        return self._stat(file).st_size

    def fingerprint(self, file: str) -> FileFingerprint:
        """Size and mtime, and for a safetensors file the hash of its header (one small read):
        a rewrite that keeps the mtime but moves, renames or reshapes a tensor is noticed."""
        st = self._stat(file)
        header = ""
        if file.endswith(".safetensors"):
            first8 = self.read_range(file, 0, min(8, st.st_size))
            length = header_length(first8, file_size=st.st_size, file_label=str(self.root / file))
            header = "sha256:" + hashlib.sha256(self.read_range(file, 0, 8 + length)).hexdigest()
        return FileFingerprint(file=file, size=st.st_size, version=f"mtime_ns:{st.st_mtime_ns}", header=header)

    def content_hash(self, file: str, cache: Path | None) -> str:
        """The sha256 of ``file``'s bytes, read once per version of the file: cached in
        ``cache`` by device, inode, size, mtime and ctime (a rewrite that restores the mtime
        still changes the ctime, so it is hashed again)."""
        path = self._path(file)
        st = self._stat(file)
        key = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{path}".encode())
        entry = cache / key.hexdigest() if cache is not None else None
        if entry is not None and entry.is_file():
            return entry.read_text().strip()
        try:
            with open(path, "rb") as stream:
                digest = "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()
        except OSError as exc:
            raise from_os_error(exc, str(path), reading_input=True) from None
        if entry is not None:
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                temp = entry.with_name(f"{entry.name}{PARTIAL_MARK}{secrets.token_hex(6)}")
                temp.write_text(digest)
                os.replace(temp, entry)
            except OSError as exc:  # a read-only cache costs a re-hash next time, nothing else
                log.debug("cannot cache the content hash of %s in %s: %s", path, cache, exc)
        return digest

    # -- reading

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(self._path(file), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    raise CheckpointError(f"{self.root / file} does not exist") from None
                except IsADirectoryError:
                    raise CheckpointError(f"{self.root / file} is a directory, not a file") from None
                except OSError as exc:
                    raise from_os_error(exc, str(self.root / file), reading_input=True) from None
                self._fds[file] = fd
            return fd

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def _short_read(self, file: str, at: int, begin: int, end: int) -> CheckpointError:
        return CheckpointError(
            f"{self.root / file} ended at byte {at} while reading bytes {begin}..{end}; "
            "the file is truncated or was changed during the merge"
        )

    def read_range_into(self, file: str, begin: int, buffer: memoryview) -> int:
        """Fill ``buffer`` with the bytes of ``file`` from offset ``begin``; no extra copy.

        Returns the number of bytes read (always ``len(buffer)``; a short file raises).
        """
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("read_range_into needs a writable buffer")
        fd = self._fd(file)
        total, n = 0, len(view)
        while total < n:
            got = os.preadv(fd, [view[total:]], begin + total)
            if got == 0:
                self._count(total)
                raise self._short_read(file, begin + total, begin, begin + n)
            total += got
        self._count(total)
        return total

    def read_range(self, file: str, begin: int, end: int) -> bytes:
        if not 0 <= begin <= end:
            raise ValueError(f"bad byte range {begin}..{end} of {file}")
        fd = self._fd(file)
        parts, total, n = [], 0, end - begin
        while total < n:
            part = os.pread(fd, n - total, begin + total)
            if not part:
                self._count(total)
                raise self._short_read(file, begin + total, begin, end)
            parts.append(part)
            total += len(part)
        self._count(total)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_file(self, file: str) -> bytes:
        return bytes(self.read_range(file, 0, self.size(file)))

    def prefetch(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        """Nothing to do: positioned reads from disk (or the page cache) need no read-ahead."""

    # -- lifetime

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> LocalCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class LocalOutput:
    """An output directory on local disk (implements ``OutputSink``).

    The directory and any parent folders of a file are created on first write, so
    opening an output has no side effect.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path).expanduser().absolute()
        self.uri = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output {self.root} is a file; give a directory")

    def __repr__(self) -> str:
        return f"LocalOutput({self.uri!r})"

    def _path(self, file: str) -> Path:
        return _relative(file, self.root, OutputError)

    def exists(self, file: str) -> bool:
        return self._path(file).is_file()

    def list_files(self) -> list[str]:
        return _walk(self.root) if self.root.is_dir() else []

    def read_file(self, file: str) -> bytes:
        try:
            return self._path(file).read_bytes()
        except FileNotFoundError:
            raise OutputError(f"{self.root / file} does not exist", path=str(self.root / file)) from None
        except OSError as exc:
            raise OutputError(
                f"cannot read {self.root / file}: {exc.strerror or exc}; make it readable by this user, "
                "or remove the output and merge again",
                path=str(self.root / file),
            ) from None

    def write_file(self, file: str, data: bytes) -> None:
        with self.open_write(file) as stream:
            stream.write(data)

    @contextlib.contextmanager
    def open_write(self, file: str) -> Iterator[BinaryIO]:
        """Write ``file`` atomically: it appears, complete, only if the block exits cleanly."""
        final = self._path(file)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_os_error(exc, str(final.parent)) from None
        temp = final.with_name(partial_name(final.name))
        try:
            stream = open(temp, "xb")  # noqa: SIM115 -- closed below on every path
        except OSError as exc:
            raise from_os_error(exc, str(final)) from None
        try:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
            os.replace(temp, final)
        except OSError as exc:
            _discard(stream, temp)
            if exc.filename not in (None, str(temp), str(final)):
                raise  # not this file's fault: the block raised it (e.g. reading an input)
            raise from_os_error(exc, str(final)) from None
        except BaseException:
            _discard(stream, temp)
            raise
        _fsync_dir(final.parent)

    def delete(self, file: str) -> None:
        try:
            self._path(file).unlink(missing_ok=True)
        except OSError as exc:
            raise from_os_error(exc, str(self.root / file)) from None

    def mismatch(self, file: str, size: int, xxh3: str, stored_checksum: str = "") -> str | None:
        """Why ``file`` is not the one written: checks the size, then the content (one read)."""
        path = self._path(file)
        try:
            with open(path, "rb") as stream:
                actual = os.fstat(stream.fileno()).st_size
                if actual != size:
                    return f"its size is {actual} bytes, its receipt says {size}"
                digest = xxhash.xxh3_128()
                while chunk := stream.read(8 * 1024 * 1024):
                    digest.update(chunk)
        except FileNotFoundError:
            return "it is missing"
        except OSError as exc:
            return f"it cannot be read ({exc.strerror})"
        if digest.hexdigest() != xxh3:
            return "its content differs from what was written (xxh3-128 mismatch)"
        return None

    def remove_partials(self) -> None:
        """Delete the temp files of writes that never completed because their process died.

        Only temp files a mergefleet process on this host wrote, at the top of the output or
        in its ``.mergefleet`` folder, and only when that process is gone: a live run's temp
        files, another host's, and those of an output nested inside this one stay.
        """
        for folder in (self.root, self.root / ".mergefleet"):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if PARTIAL_MARK in entry.name and entry.is_file(follow_symlinks=False) and _writer_is_dead(entry.name):
                    Path(entry.path).unlink(missing_ok=True)


def _discard(stream: BinaryIO, temp: Path) -> None:
    """Close and remove an unfinished temporary file (closing may fail again on a full disk)."""
    with contextlib.suppress(OSError):
        stream.close()
    with contextlib.suppress(OSError):
        temp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
