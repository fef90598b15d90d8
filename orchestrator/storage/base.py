"""The storage interface: where checkpoints are read from and merges are written to.

A backend (local disk, S3) implements ``CheckpointSource`` for inputs and ``OutputSink``
for outputs. Everything above this layer speaks only these two. ``StorageOptions`` are
the backend settings a recipe may give (``fleet.storage``); they travel in the plan to
every process that opens storage. Credentials are never among them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, ContextManager, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MiB = 1 << 20

# safetensors dtype codes and their widths in bytes.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. ``begin``/``end`` are absolute offsets in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileFingerprint:
    """What identifies one version of a file: size plus mtime (disk) or ETag (S3); on disk
    also the hash of a safetensors file's header (``header``), and with
    ``fleet.verify_inputs: content`` the hash of its whole content (``content``)."""

    file: str
    size: int
    version: str
    header: str = ""
    content: str = ""


_CREDENTIAL_WORDS = ("access_key", "secret", "token", "password", "credential", "passphrase")


class StorageOptions(BaseModel):
    """Object-storage settings (S3 and S3-compatible endpoints); local disk ignores them.

    Anything left unset comes from boto3's own chain: ``AWS_ENDPOINT_URL(_S3)``,
    ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, the config files. Credentials are not
    settings: they come only from the environment, a profile or the pod's role.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    endpoint_url: str | None = None
    """An S3-compatible endpoint, e.g. ``http://127.0.0.1:9000`` (default: AWS, or AWS_ENDPOINT_URL)."""
    region: str | None = None
    addressing_style: Literal["auto", "virtual", "path"] | None = None
    cache_dir: str | None = None
    """A local directory that keeps fetched byte ranges, keyed by object and ETag."""
    max_concurrency: int = Field(default=8, ge=1, le=64)
    """Ranged GETs (per process) and part uploads (per file) in flight at once."""
    request_bytes: int = Field(default=32 * MiB, ge=MiB, le=1024 * MiB)
    """Largest ranged GET: neighbouring tensors are coalesced up to this, larger ones split."""
    readahead_bytes: int = Field(default=128 * MiB, ge=MiB)
    """Bytes fetched ahead of the merge, per input."""
    part_size: int = Field(default=16 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)
    """Multipart upload part size (S3's minimum is 5 MiB); a smaller file is one PUT."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Attempts per request, with backoff, on throttling, 5xx and broken connections."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if any(word in str(key).lower() for word in _CREDENTIAL_WORDS):
                    raise ValueError(
                        f"'{key}' looks like a credential, and credentials never go in a recipe or a plan: "
                        "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, "
                        "or run with the pod's role"
                    )
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _plain_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
            raise ValueError(f"endpoint_url {value!r} must look like http://host:port or https://host")
        if "@" in rest.split("/", 1)[0]:
            raise ValueError("endpoint_url must not carry a user name or password; credentials come from the environment")
        return value.rstrip("/")


class CheckpointSource(Protocol):
    """A read-only checkpoint: a directory of files (safetensors, config, tokenizer)."""

    uri: str
    bytes_read: int  # counts every byte fetched from the backend, for receipts

    def list_files(self) -> list[str]: ...
    def exists(self, file: str) -> bool: ...
    def size(self, file: str) -> int: ...
    def fingerprint(self, file: str) -> FileFingerprint: ...
    def read_range(self, file: str, begin: int, end: int) -> bytes | memoryview: ...
    def read_file(self, file: str) -> bytes: ...
    def prefetch(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        """A hint: every ``(file, begin, end)`` about to be read, in reading order.

        A remote backend fetches them ahead (coalesced, concurrently, within a memory
        budget) and serves the reads that follow from memory; local disk ignores it.
        """
        ...


class OutputSink(Protocol):
    """A writable location. Files appear under their final name only when complete."""

    uri: str

    def exists(self, file: str) -> bool: ...
    def list_files(self) -> list[str]: ...
    def read_file(self, file: str) -> bytes: ...
    def write_file(self, file: str, data: bytes) -> None: ...
    def open_write(self, file: str) -> ContextManager[BinaryIO]:
        """A stream whose file becomes visible only if the ``with`` block exits cleanly."""
        ...
    def delete(self, file: str) -> None: ...
    def mismatch(self, file: str, size: int, xxh3: str, stored_checksum: str = "") -> str | None:
        """Why ``file`` is not the file that was written (``None`` when it is): missing, another
        size, other content (xxh3-128 of its bytes), or, where the backend keeps one, another
        stored checksum."""
        ...
    def remove_partials(self) -> None:
        """Delete leftovers of writes that never completed (a killed process's temp files)."""
        ...
