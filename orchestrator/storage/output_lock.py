"""One merge per output at a time: ``.mergefleet/lock`` in the output location.

On disk the lock file is held with an OS lock (``fcntl.flock``), which the kernel releases
when the holder dies, so a dead holder's lock is simply taken. On S3 the lock is an object
created with ``If-None-Match: *`` (only one creator wins) that the holder renews while it
runs; a lock whose lease ran out, or whose holder on this host is dead, is taken over with
``If-Match`` on the stale object's ETag, so two runs cannot both take it. The lock records
its holder (host, pid, start time), which a refused run names.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from orchestrator.errors import OutputError
from orchestrator.storage.base import OutputSink

log = logging.getLogger(__name__)

LOCK_FILE = ".mergefleet/lock"
LEASE_SECONDS = 60.0
"""How long an S3 lock stays valid without renewal; the holder renews it every third of that."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: float  # Unix time
    expires: float = 0.0  # Unix time; S3 only (disk locks end with their process)

    @classmethod
    def me(cls, started: float | None = None, lease: float = 0.0) -> LockHolder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), started if started is not None else now, now + lease if lease else 0.0)

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, pid {self.pid}, started {when}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        try:
            fields = json.loads(data)
            return cls(str(fields["host"]), int(fields["pid"]), float(fields["started"]), float(fields.get("expires", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None

    def is_dead(self) -> bool:
        """Whether the holder is known dead: on this host and its pid gone, or its lease over."""
        if self.expires and self.expires < time.time():
            return True
        if self.host != socket.gethostname():
            return False
        return not process_alive(self.pid)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refused(uri: str, holder: LockHolder | None) -> OutputError:
    who = holder.describe() if holder else "a holder whose lock file is unreadable"
    return OutputError(
        f"another merge is writing to {uri} ({who}); wait for it to finish, stop it, "
        "or choose another output"
    )


@contextlib.contextmanager
def _local_lock(root: str) -> Iterator[LockHolder]:
    """The disk lock. A release that finds nothing but the lock in ``.mergefleet/`` (a claim
    refused, a plan that failed) removes the lock, that folder and an output folder the lock
    created, if empty: a refused merge leaves a user's folder as it was. The file is removed
    while still locked, so a run that locked it as it went checks that its file is still the
    one at the path, and locks the new one if not."""
    path = os.path.join(root, LOCK_FILE)
    made = _missing_folders(os.path.abspath(root))
    fd = _open_locked(root, path)
    try:
        previous = LockHolder.parse(os.pread(fd, 4096, 0))
        if previous is not None:
            log.info("took over the lock of %s from a process that ended (%s)", root, previous.describe())
        holder = LockHolder.me()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.to_json(), 0)
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)  # released: an empty lock file names no holder
            _remove_if_alone(path, made)
    finally:
        os.close(fd)  # closing drops the flock


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _open_locked(root: str, path: str) -> int:
    """A descriptor of the lock file at ``path``, flocked; ``OutputError`` naming a live holder."""
    import fcntl  # POSIX only: imported where a disk lock is taken

    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileNotFoundError:  # a releasing run removed the folder in between
            continue
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {path}: {exc.strerror}; check that the output is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = LockHolder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock {path}: {exc.strerror}") from None
            raise _refused(root, holder) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it as we locked it: lock the file now at the path


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _remove_if_alone(path: str, made: list[str]) -> None:
    """With the lock still held: remove it if ``.mergefleet/`` holds nothing else, then the
    folders this lock created (the output folder and its missing parents), where empty."""
    folder = os.path.dirname(path)
    try:
        if os.listdir(folder) != [os.path.basename(path)]:
            return
        os.unlink(path)
        os.rmdir(folder)
        for directory in made:
            os.rmdir(directory)
    except OSError:  # another run put something there meanwhile: it stays
        return


class _S3Lease:
    """The S3 lock object of one holder, renewed on a thread until released."""

    def __init__(self, output: Any) -> None:
        self.output = output
        self.key = output._key(LOCK_FILE)
        self.holder = LockHolder.me(lease=LEASE_SECONDS)
        self.etag = ""
        self.taken_over: LockHolder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, **condition: str) -> None:
        response = self.output._client.put_object(
            Bucket=self.output.bucket, Key=self.key, Body=self.holder.to_json(), **condition
        )
        self.etag = response["ETag"]

    def _current(self) -> tuple[LockHolder | None, str]:
        response = self.output._client.get_object(Bucket=self.output.bucket, Key=self.key)
        with contextlib.closing(response["Body"]) as body:
            return LockHolder.parse(body.read()), response["ETag"]

    def acquire(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            try:
                self._put(IfNoneMatch="*")
            except ClientError as exc:
                if not _precondition_failed(exc):
                    raise
                stale, etag = self._current()
                if stale is not None and not stale.is_dead():
                    raise _refused(self.output.uri, stale) from None
                try:
                    self._put(IfMatch=etag)  # only one of several runs taking over wins
                except ClientError as lost:
                    if _precondition_failed(lost):
                        raise _refused(self.output.uri, self._current()[0]) from None
                    raise
                self.taken_over = stale
                log.info("took over the stale lock of %s (%s)", self.output.uri, stale.describe() if stale else "unreadable")
        except (ClientError, BotoCoreError) as exc:
            raise self.output._error(exc, "lock", self.key) from None
        self._thread = threading.Thread(target=self._renew, name="s3-lock-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(LEASE_SECONDS / 3):
            self.holder = LockHolder.me(started=self.holder.started, lease=LEASE_SECONDS)
            try:
                self._put(IfMatch=self.etag)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not renew the lock of %s (%s)", self.output.uri, type(exc).__name__)

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.output._client.delete_object(Bucket=self.output.bucket, Key=self.key, IfMatch=self.etag)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not release the lock of %s (%s); it expires by itself", self.output.uri, type(exc).__name__)


def _precondition_failed(exc: Any) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code")) in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


@contextlib.contextmanager
def _s3_lock(output: Any) -> Iterator[LockHolder]:
    lease = _S3Lease(output)
    lease.acquire()
    try:
        yield lease.holder
    finally:
        lease.release()


_held: dict[tuple[int, str], LockHolder] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def hold_output_lock(sink: OutputSink) -> Iterator[LockHolder]:
    """Hold the output's lock for a ``with`` block, or raise ``OutputError`` naming the holder.

    Re-entrant within a process: a step of a merge that already holds the lock (the flow's
    plan task inside the flow) goes on under it."""
    from orchestrator.storage.local import LocalOutput

    key = (os.getpid(), sink.uri)
    with _held_guard:
        mine = _held.get(key)
    if mine is not None:
        yield mine
        return
    lock = _local_lock(str(sink.root)) if isinstance(sink, LocalOutput) else _s3_lock(sink)
    with lock as holder:
        with _held_guard:
            _held[key] = holder
        try:
            yield holder
        finally:
            with _held_guard:
                _held.pop(key, None)
