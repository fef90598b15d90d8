"""Reading a checkpoint under an S3 prefix: one listing for sizes and ETags, ranged GETs
with ``If-Match``, read-ahead and the optional range cache."""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from orchestrator.errors import CheckpointError, MergefleetError
from orchestrator.storage.base import FileFingerprint, MiB, StorageOptions
from orchestrator.storage.s3.client import backoff, join_key, parse_s3_uri, request_pool, s3_client, s3_error, s3_uri
from orchestrator.storage.s3.range_cache import RangeCache
from orchestrator.storage.s3.readahead import ReadAhead, plan_requests

log = logging.getLogger(__name__)

_CHUNK = MiB
"""Bytes taken from a response body at a time."""

_STREAM_ERRORS = (
    OSError,
    Urllib3Error,
    IncompleteReadError,
    ResponseStreamingError,
    ReadTimeoutError,
    ConnectionClosedError,
)
"""A response body that broke off midway: the rest is fetched again."""


class S3Checkpoint:
    """A checkpoint under an S3 prefix (implements ``CheckpointSource``).

    Opening lists the prefix once: sizes and ETags then need no further request.
    """

    def __init__(self, uri: str, *, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self.bucket, self.prefix = parse_s3_uri(uri, CheckpointError)
        self.uri = s3_uri(self.bucket, self.prefix)
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
        return join_key(self.prefix, file, CheckpointError, self.uri)

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
                time.sleep(backoff(failures))
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
            pool=request_pool(options.max_concurrency),
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
