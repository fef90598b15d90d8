"""The safetensors file format as pure functions: parse and build headers, map dtypes.

No I/O here. A safetensors file is::

    u64 little-endian N | N bytes of JSON header (space padded) | data area

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
with offsets relative to the data area, plus an optional ``"__metadata__"`` str→str map.
Everything is validated before any buffer is sized from it.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping, Sequence

import torch

from orchestrator.errors import CheckpointError, MergeError, RecipeError
from orchestrator.storage.base import DTYPE_SIZES, TensorInfo

HEADER_LIMIT = 100_000_000
"""Largest header we accept, in bytes (the safetensors library's own limit)."""

METADATA_KEY = "__metadata__"

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
_DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in _TORCH_DTYPES.items()}

# User-facing names (recipes, CLI flags, config.json's torch_dtype) of the dtypes a merge
# may be written in.
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


# ---------------------------------------------------------------- dtypes


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"`` → ``torch.bfloat16``)."""
    try:
        return _TORCH_DTYPES[code]
    except KeyError:
        raise CheckpointError(
            f"unknown safetensors dtype {code!r}; known: {', '.join(sorted(_TORCH_DTYPES))}"
        ) from None


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        known = ", ".join(sorted(str(d).removeprefix("torch.") for d in _DTYPE_CODES))
        raise MergeError(
            f"safetensors cannot store dtype {dtype}; convert the tensor to one of: {known}"
        ) from None


def parse_dtype_name(name: str) -> torch.dtype:
    """A user-facing dtype name (``"bfloat16"``, ``"bf16"``, ``"half"``, …) as a torch dtype.

    Case-insensitive; a ``torch.`` prefix is allowed.
    """
    key = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_NAMES[key]
    except KeyError:
        raise RecipeError(
            f"unknown dtype {name!r}; use one of: {', '.join(sorted(_DTYPE_NAMES))}"
        ) from None


# ---------------------------------------------------------------- reading


def header_length(first8: bytes | memoryview, *, file_size: int, file_label: str) -> int:
    """The header length N from a file's first 8 bytes, checked against the file's size."""
    if file_size < 8 or len(first8) < 8:
        raise CheckpointError(
            f"{file_label} is {file_size} bytes, too short for a safetensors file "
            "(at least 8 bytes of header length are needed); the file is truncated "
            "or not safetensors"
        )
    (n,) = struct.unpack("<Q", bytes(first8[:8]))
    if n == 0:
        raise CheckpointError(
            f"{file_label} has a header length of 0; the file is corrupt or not safetensors"
        )
    if 8 + n > file_size:
        raise CheckpointError(
            f"header length {n} points past the end of the {file_size}-byte file "
            f"{file_label}; the file is truncated or not safetensors"
        )
    if n > HEADER_LIMIT:
        raise CheckpointError(
            f"header length {n} of {file_label} is over the {HEADER_LIMIT}-byte limit; "
            "the file is corrupt or not safetensors"
        )
    return n


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(
    header_bytes: bytes | memoryview,
    *,
    data_size: int,
    file_label: str,
    file: str | None = None,
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header and return its tensors (ordered by offset) and its metadata.

    ``header_bytes`` is the N header bytes exactly; ``data_size`` is the file size minus
    ``8 + N``. ``file`` is the name stored in each ``TensorInfo`` (defaults to
    ``file_label``, which is what error messages say). Offsets in the result are
    absolute file offsets.
    """
    file = file_label if file is None else file
    data_start = 8 + len(header_bytes)
    try:
        text = bytes(header_bytes).decode("utf-8")
        raw = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"the safetensors header of {file_label} is not valid JSON ({exc}); "
            "the file is corrupt or not safetensors"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"the safetensors header of {file_label} is a JSON {type(raw).__name__}, "
            "not an object; the file is corrupt or not safetensors"
        )

    metadata = raw.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"the {METADATA_KEY} of {file_label} must map strings to strings, "
            f"got {json.dumps(metadata)[:200]}"
        )

    tensors: list[TensorInfo] = []
    for name, entry in raw.items():
        where = f"tensor {name!r} in {file_label}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: the header entry is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: the header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(
                f"{where} has unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_SIZES))}"
            )
        if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
            raise CheckpointError(
                f"{where} has shape {shape!r}; a shape is a list of non-negative integers"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_index(o) for o in offsets)
        ):
            raise CheckpointError(
                f"{where} has data_offsets {offsets!r}; expected [begin, end], "
                "two non-negative integers"
            )
        begin, end = offsets
        if not begin <= end <= data_size:
            raise CheckpointError(
                f"{where} has data_offsets [{begin}, {end}] outside the data area "
                f"(0..{data_size} bytes); the file is truncated or corrupt"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise CheckpointError(
                f"{where} is {dtype} {shape} = {expected} bytes but its data_offsets "
                f"[{begin}, {end}] span {end - begin} bytes; the file is corrupt"
            )
        tensors.append(
            TensorInfo(
                name=name,
                dtype=dtype,
                shape=tuple(shape),
                file=file,
                begin=data_start + begin,
                end=data_start + end,
            )
        )

    tensors.sort(key=lambda t: (t.begin, t.end))
    furthest: TensorInfo | None = None  # the tensor reaching furthest so far
    for info in tensors:
        if furthest is not None and info.begin < furthest.end:
            raise CheckpointError(
                f"tensors {furthest.name!r} (data bytes {furthest.begin - data_start}.."
                f"{furthest.end - data_start}) and {info.name!r} (data bytes "
                f"{info.begin - data_start}..{info.end - data_start}) overlap in "
                f"{file_label}; the file is corrupt"
            )
        if furthest is None or info.end > furthest.end:
            furthest = info
    return {t.name: t for t in tensors}, dict(metadata)


# ---------------------------------------------------------------- writing


def build_header(
    entries: Sequence[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[tuple[int, int]]]:
    """The bytes that start a safetensors file, and each tensor's data offsets.

    ``entries`` are ``(name, dtype_code, shape)``; tensors are laid out back to back in
    that order (put wider dtypes first to keep every tensor aligned, as the safetensors
    library does). The prefix is the 8-byte length plus the compact JSON header padded
    with spaces to a multiple of 8. ``metadata`` gets ``"format": "pt"`` if it has no
    ``format`` (``transformers`` refuses files without it).
    """
    meta = {"format": "pt", **(metadata or {})}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MergeError(
                f"safetensors metadata must map strings to strings; {key!r}: {value!r} "
                "is not (use json.dumps for structured values)"
            )

    header: dict[str, Any] = {METADATA_KEY: meta}
    offsets: list[tuple[int, int]] = []
    position = 0
    for name, code, shape in entries:
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise MergeError(f"tensor name {name!r} cannot be written to safetensors")
        if name in header:
            raise MergeError(f"tensor {name!r} is listed twice for one safetensors file")
        if code not in DTYPE_SIZES:
            raise MergeError(
                f"tensor {name!r} has unknown dtype {code!r}; "
                f"known: {', '.join(sorted(DTYPE_SIZES))}"
            )
        shape = list(shape)
        if not all(_is_index(d) for d in shape):
            raise MergeError(f"tensor {name!r} has shape {shape!r}; dimensions must be >= 0")
        nbytes = math.prod(shape) * DTYPE_SIZES[code]
        offsets.append((position, position + nbytes))
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes

    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def aligned_order(entries: Sequence[tuple[str, str, Sequence[int]]]) -> list[tuple[str, str, Sequence[int]]]:
    """``entries`` widest dtype first, then by name (close to the safetensors library's own
    order), so that every tensor's data starts at a multiple of its element size."""
    return sorted(entries, key=lambda e: (-DTYPE_SIZES.get(e[1], 0), e[0]))
