"""Writing a merge under an S3 prefix: each file a multipart upload streamed while it is
produced, visible only once complete; unfinished uploads of killed processes aborted."""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import xxhash
from botocore.exceptions import BotoCoreError, ClientError

from orchestrator.errors import MergefleetError, OutputError
from orchestrator.storage.base import MiB, StorageOptions
from orchestrator.storage.s3.client import MISSING_CODES, join_key, parse_s3_uri, s3_client, s3_error, s3_uri

log = logging.getLogger(__name__)

_MAX_PARTS = 10_000


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
        self.stored_checksum = ""  # "ALGORITHM:value" S3 stores with the object, or "ETag:..."

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
                response = self._client.put_object(Bucket=bucket, Key=self._key, Body=self._buffer)
            except (ClientError, BotoCoreError) as exc:
                raise self._output._error(exc, "write", self._key) from None
            self._buffer = bytearray()
            self.stored_checksum = checksum_of(response)
            return
        if self._buffer:
            self._send()
        parts = [part.result() for part in self._parts]
        try:
            response = self._client.complete_multipart_upload(
                Bucket=bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
            self.stored_checksum = checksum_of(response)
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


def checksum_of(response: dict[str, Any]) -> str:
    """What S3 stores with an object, from a PUT, complete or HEAD response: its ETag and the
    checksums it keeps (CRC32, CRC64NVME, SHA256…), as ``ETag=…;CRC32=…``."""
    found = {"ETag": str(response.get("ETag", "")).strip('"')}
    found |= {key[len("Checksum"):]: str(value) for key, value in response.items()
              if key.startswith("Checksum") and key != "ChecksumType" and value}
    return ";".join(f"{name}={value}" for name, value in sorted(found.items()))


def checksums_differ(recorded: str, now: str) -> bool:
    """Whether two ``checksum_of`` records disagree on the ETag or on any checksum both name."""
    a = dict(item.split("=", 1) for item in recorded.split(";") if "=" in item)
    b = dict(item.split("=", 1) for item in now.split(";") if "=" in item)
    return any(a[name] != b[name] for name in a.keys() & b.keys()) or a.get("ETag") != b.get("ETag")


def _top_level(name: str) -> bool:
    folder, _, _ = name.rpartition("/")
    return folder in ("", ".mergefleet")


class S3Output:
    """An output location under an S3 prefix (implements ``OutputSink``).

    Opening has no side effect; the bucket must exist.
    """

    def __init__(self, uri: str, *, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self.bucket, self.prefix = parse_s3_uri(uri, OutputError)
        self.uri = s3_uri(self.bucket, self.prefix)
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
        return join_key(self.prefix, file, OutputError, self.uri)

    def exists(self, file: str) -> bool:
        key = self._key(file)
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in MISSING_CODES:
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

    def mismatch(self, file: str, size: int, xxh3: str, stored_checksum: str = "") -> str | None:
        """Why ``file`` is not the one written: compares the object's size and the checksum
        S3 stores with it (a HEAD); without a recorded checksum, the content (one read)."""
        key = self._key(file)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in MISSING_CODES:
                return "it is missing"
            raise self._error(exc, "look up", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "look up", key) from None
        if head["ContentLength"] != size:
            return f"its size is {head['ContentLength']} bytes, its receipt says {size}"
        if stored_checksum:
            now = checksum_of(head)
            if checksums_differ(stored_checksum, now):
                return f"S3's checksum of it is {now}, its receipt says {stored_checksum}"
            return None
        digest = xxhash.xxh3_128()
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                while chunk := body.read(8 * MiB):
                    digest.update(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "read", key) from None
        if digest.hexdigest() != xxh3:
            return "its content differs from what was written (xxh3-128 mismatch)"
        return None

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

        Only uploads of files at the top of this output or in its ``.mergefleet`` folder (an
        output nested under this prefix keeps its own). A merge calls it while holding the
        output's lock and before its shards start, so no upload it aborts is its own run's;
        an upload of another live writer that ignores the lock would be aborted too.
        """
        uploads = [(key, upload_id) for key, upload_id in self.unfinished_uploads() if _top_level(key[len(self._root):])]
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
