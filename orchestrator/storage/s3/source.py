"""S3 storage: ``S3Checkpoint`` reads inputs with ranged GETs, ``S3Output`` writes merges
with multipart uploads. Any S3-compatible endpoint works.

Settings come from ``StorageOptions`` (endpoint, region, addressing style, cache, tuning);
everything else, credentials above all, comes from boto3's own chain: the environment
(``AWS_ACCESS_KEY_ID``…, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``), a profile
(``AWS_PROFILE``) or the pod's role. No credential passes through this module's
arguments, and no message it writes contains one.

Reading. The listing of a checkpoint's prefix gives every object's size and ETag in one
request, so headers cost one ranged GET each (two for a header over 64 KiB). A shard
announces every byte range it will read, in order (``prefetch``); neighbouring ranges of
a file are coalesced into requests of at most ``request_bytes``, fetched on a small
thread pool while at most ``readahead_bytes`` per input are held, and each later read is
served from those buffers, which are freed as the reads move past them. Every GET carries
``If-Match: <planned ETag>``, so an object replaced mid-merge is an error, not a silent
mix of two versions. ``bytes_read`` counts the bytes that came over the network.

Writing. ``open_write`` streams a file as a multipart upload whose parts go up in the
background while the merge produces the next ones; the object exists only once the upload
completes, and an exception aborts it. A killed process cannot abort its own upload:
``remove_partials`` (run before and after every merge) aborts the stale ones.

Cache. With ``cache_dir``, fetched byte ranges are kept in a sparse local file per object
version (keyed by ETag), so merging the same inputs again reads them from disk.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from orchestrator.errors import CheckpointError, MergefleetError, OutputError
from orchestrator.storage.base import FileFingerprint, MiB, StorageOptions

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_CHUNK = MiB
"""Bytes taken from a response body at a time."""
_MAX_GAP = 256 * 1024
"""Largest hole between two wanted ranges that one request may span."""
_GAP_FRACTION = 0.02
"""Spanned holes may add at most this fraction to the bytes wanted."""
_MAX_PARTS = 10_000

_STREAM_ERRORS = (
    OSError,
    Urllib3Error,
    IncompleteReadError,
    ResponseStreamingError,
    ReadTimeoutError,
    ConnectionClosedError,
)
"""A response body that broke off midway: the rest is fetched again."""

_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
}
_DENIED_HINTS = {
    "InvalidAccessKeyId": "the endpoint does not know the access key id in use",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
}
_MISSING = {"NoSuchKey", "404", "NotFound"}


# ---------------------------------------------------------------- references


def parse_s3_uri(uri: str, error: type[MergefleetError] = CheckpointError) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")`` (no slashes at the ends)."""
    match = re.match(r"^[sS]3://([^/]*)/?(.*)$", uri)
    if match is None:
        raise error(f"{uri!r} is not an S3 reference; write s3://bucket/prefix")
    bucket, prefix = match.group(1), match.group(2).strip("/")
    if not _BUCKET.match(bucket):
        raise error(
            f"{uri}: {bucket!r} is not a valid bucket name (3 to 63 lowercase letters, digits, '.', '-')"
        )
    if ".." in PurePosixPath(prefix).parts or "//" in prefix:
        raise error(f"{uri}: the prefix must not contain '..' or '//'")
    return bucket, prefix


def _join(prefix: str, file: str, error: type[MergefleetError], uri: str) -> str:
    rel = PurePosixPath(file)
    if not file or rel.is_absolute() or ".." in rel.parts or file.endswith("/"):
        raise error(f"{file!r} is not a relative file name inside {uri}")
    return f"{prefix}/{file}" if prefix else file


def _uri(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


# ---------------------------------------------------------------- clients

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _environment_key() -> str:
    """A digest of the ``AWS_*`` environment boto3 reads, so a client made under other
    credentials or another endpoint is not reused. Only the digest is kept."""
    digest = hashlib.sha256()
    for name in sorted(os.environ):
        if name.startswith("AWS_"):
            digest.update(f"{name}\0{os.environ[name]}\0".encode())
    return digest.hexdigest()


def s3_client(options: StorageOptions | None = None, *, error: type[MergefleetError] = CheckpointError) -> Any:
    """A boto3 S3 client for ``options`` (one per process, options and AWS environment)."""
    options = options or StorageOptions()
    key = (os.getpid(), options, _environment_key())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _make_client(options, error)
        return client


def _make_client(options: StorageOptions, error: type[MergefleetError]) -> Any:
    import boto3
    from botocore.config import Config

    settings: dict[str, Any] = {
        "retries": {"mode": "standard", "total_max_attempts": options.max_attempts},
        "max_pool_connections": 2 * options.max_concurrency + 4,
        "connect_timeout": 10,
        "read_timeout": 60,
        "tcp_keepalive": True,
    }
    if options.region:
        settings["region_name"] = options.region
    if options.addressing_style:
        settings["s3"] = {"addressing_style": options.addressing_style}
    try:
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=options.endpoint_url, config=Config(**settings))
    except ProfileNotFound as exc:
        raise error(f"{exc}; set AWS_PROFILE to a profile of ~/.aws/config, or unset it") from None
    except (BotoCoreError, ValueError) as exc:
        raise error(f"cannot set up an S3 client: {exc}") from None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool for ranged GETs (shared by every input, so the total is bounded)."""
    key = (os.getpid(), workers)
    with _clients_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="s3-get")
        return pool


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: up to 0.2 s × 2^attempt, at most 10 s."""
    return random.random() * min(10.0, 0.2 * 2**attempt)


# ---------------------------------------------------------------- errors


def s3_error(
    exc: Exception,
    *,
    action: str,
    bucket: str,
    key: str = "",
    endpoint: str | None = None,
    error: type[MergefleetError] = CheckpointError,
) -> MergefleetError:
    """One actionable line for a failed S3 call; names bucket and key, never credentials."""
    label = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    where = endpoint or "the default AWS endpoint"
    if isinstance(exc, ClientError):
        details = exc.response.get("Error", {})
        code = str(details.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return error(
                f"cannot {action} {label}: the bucket {bucket!r} does not exist at {where}; "
                "check the bucket name, fleet.storage.endpoint_url / AWS_ENDPOINT_URL and the region"
            )
        if code in _MISSING:
            return error(f"cannot {action} {label}: no such object (NoSuchKey)")
        if code in _DENIED or status == 403:
            hint = _DENIED_HINTS.get(code, "the credentials in use are not allowed to (check the IAM policy and the bucket policy)")
            return error(
                f"access denied: cannot {action} {label} ({code or status}): {hint}; credentials come from "
                "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), a profile (AWS_PROFILE) or the pod's role"
            )
        if code in ("PreconditionFailed", "412") or status == 412:
            return error(
                f"{label} changed during the merge (its ETag is no longer the planned one); "
                "run 'mergefleet plan' again (or 'mergefleet merge --overwrite')"
            )
        if code == "InvalidRange" or status == 416:
            return error(f"cannot {action} {label}: the object is shorter than its header says; it is truncated or was replaced")
        if status is not None and (status >= 500 or status == 429 or code in ("SlowDown", "Throttling")):
            return error(
                f"cannot {action} {label}: the S3 endpoint kept failing ({code or status}) through every retry; "
                "try again later, or lower fleet.storage.max_concurrency"
            )
        message = str(details.get("Message", ""))[:200]
        return error(f"cannot {action} {label}: S3 said {code or status}" + (f" ({message})" if message else ""))
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return error(
            f"cannot {action} {label}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run with a role"
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
        return error(
            f"cannot {action} {label}: the S3 endpoint {where} is unreachable ({type(exc).__name__}); check "
            "fleet.storage.endpoint_url or AWS_ENDPOINT_URL, the network, and that the server is up"
        )
    return error(f"cannot {action} {label}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- read planning


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


# ---------------------------------------------------------------- local cache


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


# ---------------------------------------------------------------- reading


class S3Checkpoint:
    """A checkpoint under an S3 prefix (implements ``CheckpointSource``).

    Opening lists the prefix once: sizes and ETags then need no further request.
    """

    def __init__(self, uri: str, *, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self.bucket, self.prefix = parse_s3_uri(uri, CheckpointError)
        self.uri = _uri(self.bucket, self.prefix)
        self.bytes_read = 0
        self.bytes_cached = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._client = s3_client(self.options, error=CheckpointError)
        self._readahead: ReadAhead | None = None
        self._caches: dict[str, RangeCache | None] = {}
        self._objects = self._list()

    def __repr__(self) -> str:
        return f"S3Checkpoint({self.uri!r})"

    def _error(self, exc: Exception, action: str, key: str = "") -> MergefleetError:
        return s3_error(
            exc, action=action, bucket=self.bucket, key=key or self.prefix,
            endpoint=self._client.meta.endpoint_url, error=CheckpointError,
        )

    def _list(self) -> dict[str, tuple[int, str]]:
        root = f"{self.prefix}/" if self.prefix else ""
        objects: dict[str, tuple[int, str]] = {}
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
                self.requests += 1
                for item in page.get("Contents", []):
                    name = item["Key"][len(root) :]
                    if name and not name.endswith("/"):
                        objects[name] = (int(item["Size"]), str(item["ETag"]).strip('"'))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list") from None
        if not objects:
            if self.prefix and self._is_object(self.prefix):
                raise CheckpointError(
                    f"{self.uri} is an object; a checkpoint is the prefix that holds config.json "
                    "and the .safetensors files"
                )
            raise CheckpointError(f"{self.uri} holds no objects: there is no checkpoint under this prefix")
        return objects

    def _is_object(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except (ClientError, BotoCoreError):
            return False

    # -- listing and metadata

    def _key(self, file: str) -> str:
        return _join(self.prefix, file, CheckpointError, self.uri)

    def _object(self, file: str) -> tuple[int, str]:
        found = self._objects.get(file)
        if found is None:
            self._key(file)
            raise CheckpointError(f"{self.uri}/{file} does not exist")
        return found

    def list_files(self) -> list[str]:
        return sorted(self._objects)

    def exists(self, file: str) -> bool:
        return file in self._objects

    def size(self, file: str) -> int:
        return self._object(file)[0]

    def etag(self, file: str) -> str:
        return self._object(file)[1]

    def fingerprint(self, file: str) -> FileFingerprint:
        size, etag = self._object(file)
        return FileFingerprint(file=file, size=size, version=f"etag:{etag}")

    # -- reading

    def _count(self, n: int, requests: int = 0) -> None:
        with self._lock:
            self.bytes_read += n
            self.requests += requests

    def _cache(self, file: str) -> RangeCache | None:
        if not self.options.cache_dir:
            return None
        if file not in self._caches:
            size, etag = self._object(file)
            self._caches[file] = RangeCache(self.options.cache_dir, self.bucket, self._key(file), etag, size)
        return self._caches[file]

    def _fetch_into(self, file: str, begin: int, view: memoryview) -> None:
        """Fill ``view`` with bytes ``begin``… of ``file``: from the cache, else one ranged GET."""
        cache = self._cache(file)
        if cache is not None:
            try:
                if cache.read_into(begin, view):
                    with self._lock:
                        self.bytes_cached += len(view)
                    return
            except OSError as exc:
                log.warning("the S3 cache in %s is unreadable (%s); reading from S3", self.options.cache_dir, exc)
        self._get_into(file, begin, view)
        if cache is not None:
            try:
                cache.store(begin, view)
            except OSError as exc:
                log.warning("cannot write the S3 cache in %s (%s); going on without it", self.options.cache_dir, exc)
                self._caches[file] = None

    def _get_into(self, file: str, begin: int, view: memoryview) -> None:
        _size, etag = self._object(file)
        key = self._key(file)
        n, got, failures = len(view), 0, 0
        while got < n:
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={begin + got}-{begin + n - 1}", IfMatch=f'"{etag}"'
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "read", key) from None
            self._count(0, requests=1)
            body, ended = response["Body"], False
            try:
                while got < n:
                    chunk = body.read(min(n - got, _CHUNK))
                    if not chunk:
                        ended = True
                        break
                    view[got : got + len(chunk)] = chunk
                    got += len(chunk)
                    self._count(len(chunk))
            except _STREAM_ERRORS as exc:
                failures += 1
                if failures >= self.options.max_attempts:
                    raise CheckpointError(
                        f"reading s3://{self.bucket}/{key} (bytes {begin}..{begin + n}): the connection broke "
                        f"{failures} times ({type(exc).__name__}); check the network and the endpoint"
                    ) from None
                log.debug("s3://%s/%s: response broke off (%s); fetching the rest again", self.bucket, key, exc)
                time.sleep(_backoff(failures))
                continue
            finally:
                body.close()
            if ended:
                raise CheckpointError(
                    f"s3://{self.bucket}/{key} ended at byte {begin + got} while reading bytes {begin}..{begin + n}; "
                    "the object is truncated or was changed during the merge"
                )

    def _check_range(self, file: str, begin: int, end: int) -> None:
        size = self.size(file)
        if not 0 <= begin <= end:
            raise ValueError(f"bad byte range {begin}..{end} of {file}")
        if end > size:
            raise CheckpointError(
                f"{self.uri}/{file} is {size} bytes but bytes {begin}..{end} were asked for; "
                "the file is truncated or its header lies"
            )

    def read_range_into(self, file: str, begin: int, buffer: memoryview) -> int:
        """Fill ``buffer`` with the bytes of ``file`` from offset ``begin``."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("read_range_into needs a writable buffer")
        n = len(view)
        self._check_range(file, begin, begin + n)
        if n == 0:
            return 0
        readahead = self._readahead
        if readahead is None or not readahead.serve(file, begin, view):
            self._fetch_into(file, begin, view)
        return n

    def read_range(self, file: str, begin: int, end: int) -> bytes:
        self._check_range(file, begin, end)
        buffer = bytearray(end - begin)
        self.read_range_into(file, begin, memoryview(buffer))
        return bytes(buffer)

    def read_file(self, file: str) -> bytes:
        return self.read_range(file, 0, self.size(file))

    def prefetch(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        """Start fetching ``ranges`` (reading order): coalesced, concurrent, within the budget."""
        for file, begin, end in ranges:
            self._check_range(file, begin, end)
        if self._readahead is not None:
            self._readahead.close()
        options = self.options
        self._readahead = ReadAhead(
            self._fetch_into,
            plan_requests(ranges, max_request=options.request_bytes),
            budget=max(options.readahead_bytes, options.request_bytes),
            pool=_pool(options.max_concurrency),
        )

    # -- lifetime

    def close(self) -> None:
        if self._readahead is not None:
            self._readahead.close()
            self._readahead = None

    def __enter__(self) -> S3Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- writing


class _Upload:
    """The stream ``S3Output.open_write`` yields: a multipart upload, begun lazily.

    A file smaller than one part becomes a single PUT. Parts go up on their own threads
    (at most ``max_concurrency``, so memory stays at a few parts) while the writer goes on.
    """

    def __init__(self, output: S3Output, key: str) -> None:
        self._output = output
        self._client = output._client
        self._key = key
        self._part_size = output.options.part_size
        self._in_flight = max(1, min(4, output.options.max_concurrency))
        self._slots = threading.BoundedSemaphore(self._in_flight)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._executor: ThreadPoolExecutor | None = None
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def _failed(self) -> None:
        for part in self._parts:
            if part.done() and not part.cancelled() and part.exception() is not None:
                raise part.exception()  # type: ignore[misc]

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        position, n = 0, len(view)
        while position < n:
            take = min(self._part_size - len(self._buffer), n - position)
            self._buffer += view[position : position + take]
            position += take
            if len(self._buffer) >= self._part_size:
                self._send()
        self.bytes_written += n
        return n

    def _send(self) -> None:
        self._failed()
        if self._upload_id is None:
            try:
                response = self._client.create_multipart_upload(Bucket=self._output.bucket, Key=self._key)
            except (ClientError, BotoCoreError) as exc:
                raise self._output._error(exc, "start an upload to", self._key) from None
            self._upload_id = response["UploadId"]
            self._executor = ThreadPoolExecutor(self._in_flight, thread_name_prefix="s3-put")
        number = len(self._parts) + 1
        if number > _MAX_PARTS:
            raise OutputError(f"s3://{self._output.bucket}/{self._key} needs over {_MAX_PARTS} parts; raise fleet.storage.part_size")
        data, self._buffer = self._buffer, bytearray()  # handed over, not copied
        self._slots.acquire()
        assert self._executor is not None
        future = self._executor.submit(self._put_part, number, data)
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)
        if number % 1000 == 0:  # stay under S3's 10,000 parts for any file size
            self._part_size = min(2 * self._part_size, 5 * 1024 * MiB)

    def _put_part(self, number: int, data: bytearray) -> dict[str, Any]:
        try:
            response = self._client.upload_part(
                Bucket=self._output.bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=data
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._output._error(exc, "upload a part of", self._key) from None
        part = {"PartNumber": number, "ETag": response["ETag"]}
        part.update({k: v for k, v in response.items() if k.startswith("Checksum") and k != "ChecksumType"})
        return part

    def complete(self) -> None:
        bucket = self._output.bucket
        if self._upload_id is None:
            try:
                self._client.put_object(Bucket=bucket, Key=self._key, Body=self._buffer)
            except (ClientError, BotoCoreError) as exc:
                raise self._output._error(exc, "write", self._key) from None
            self._buffer = bytearray()
            return
        if self._buffer:
            self._send()
        parts = [part.result() for part in self._parts]
        try:
            self._client.complete_multipart_upload(
                Bucket=bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._output._error(exc, "complete the upload of", self._key) from None
        self._shutdown()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def abort(self) -> None:
        """Drop the upload: no object appears, no parts stay behind (best effort)."""
        self._buffer = bytearray()
        self._shutdown()
        if self._upload_id is None:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self._output.bucket, Key=self._key, UploadId=self._upload_id)
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "could not abort the upload of s3://%s/%s (%s); the next run's cleanup aborts it",
                self._output.bucket, self._key, type(exc).__name__,
            )


class S3Output:
    """An output location under an S3 prefix (implements ``OutputSink``).

    Opening has no side effect; the bucket must exist.
    """

    def __init__(self, uri: str, *, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self.bucket, self.prefix = parse_s3_uri(uri, OutputError)
        self.uri = _uri(self.bucket, self.prefix)
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._client = s3_client(self.options, error=OutputError)

    def __repr__(self) -> str:
        return f"S3Output({self.uri!r})"

    def _error(self, exc: Exception, action: str, key: str = "") -> MergefleetError:
        return s3_error(
            exc, action=action, bucket=self.bucket, key=key or self.prefix,
            endpoint=self._client.meta.endpoint_url, error=OutputError,
        )

    def _key(self, file: str) -> str:
        return _join(self.prefix, file, OutputError, self.uri)

    def exists(self, file: str) -> bool:
        key = self._key(file)
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _MISSING:
                return False
            raise self._error(exc, "look up", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "look up", key) from None

    def list_files(self) -> list[str]:
        found = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._root):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self._root) :]
                    if name and not name.endswith("/"):
                        found.append(name)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list") from None
        return sorted(found)

    def read_file(self, file: str) -> bytes:
        key = self._key(file)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "read", key) from None

    def write_file(self, file: str, data: bytes) -> None:
        key = self._key(file)
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "write", key) from None

    @contextlib.contextmanager
    def open_write(self, file: str) -> Iterator[_Upload]:
        """Stream ``file`` up; the object appears, complete, only if the block exits cleanly."""
        upload = _Upload(self, self._key(file))
        try:
            yield upload
            upload.complete()
        except BaseException:
            upload.abort()
            raise

    def delete(self, file: str) -> None:
        key = self._key(file)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "delete", key) from None

    def unfinished_uploads(self) -> list[tuple[str, str]]:
        """``(key, upload id)`` of every multipart upload begun under the prefix and not finished."""
        found = []
        try:
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self._root):
                found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list the uploads under") from None
        return found

    def remove_partials(self) -> None:
        """Abort the multipart uploads of writes that never completed (a killed process's).

        Call it only while nothing is writing to this output: it also aborts uploads in progress.
        """
        uploads = self.unfinished_uploads()
        for key, upload_id in uploads:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise self._error(exc, "abort the unfinished upload of", key) from None
            except BotoCoreError as exc:
                raise self._error(exc, "abort the unfinished upload of", key) from None
        if uploads:
            log.info("aborted %d unfinished upload(s) under %s", len(uploads), self.uri)
