"""The storage interface: where checkpoints are read from and merges are written to.

A backend (local disk now, S3 next) implements ``CheckpointSource`` for inputs and
``OutputSink`` for outputs. Everything above this layer speaks only these two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, ContextManager, Protocol

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
    """What identifies one version of a file: size plus mtime (disk) or ETag (S3)."""

    file: str
    size: int
    version: str


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
    def remove_partials(self) -> None:
        """Delete leftovers of writes that never completed (a killed process's temp files)."""
        ...
