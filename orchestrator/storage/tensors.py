"""Reading tensor data from a checkpoint: exactly the bytes of a tensor (or of some of its
rows), into a fresh buffer or the caller's; and the read-ahead hint a remote backend uses."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from orchestrator.errors import CheckpointError
from orchestrator.storage.base import DTYPE_SIZES, CheckpointSource, TensorInfo
from orchestrator.storage.checkpoint import file_label
from orchestrator.storage.safetensors_format import torch_dtype


def prefetch(source: CheckpointSource, ranges: Sequence[tuple[str, int, int]]) -> None:
    """Announce every ``(file, begin, end)`` about to be read from ``source``, in reading
    order. On S3 they are fetched ahead (coalesced, concurrently, in bounded memory) and
    the reads that follow are served from memory; local disk ignores the hint."""
    hint = getattr(source, "prefetch", None)
    if hint is not None and ranges:
        hint(ranges)


def _read_bytes_into(source: CheckpointSource, file: str, begin: int, buffer: torch.Tensor) -> None:
    """Fill the 1-D uint8 CPU ``buffer`` from ``file`` at ``begin``."""
    n = buffer.numel()
    if n == 0:
        return
    view = memoryview(buffer.numpy())
    read_into = getattr(source, "read_range_into", None)
    if read_into is not None:
        read_into(file, begin, view)
        return
    data = source.read_range(file, begin, begin + n)
    if len(data) != n:
        raise CheckpointError(
            f"{file_label(source, file)}: asked for bytes {begin}..{begin + n}, got {len(data)} bytes; "
            "the file is truncated or was changed during the merge"
        )
    view[:] = data


def _byte_buffer(info: TensorInfo, nbytes: int, shape: Sequence[int], out: torch.Tensor | None) -> torch.Tensor:
    """A uint8 view of ``out`` (checked) or a fresh buffer of ``nbytes``."""
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    dtype = torch_dtype(info.dtype)
    if out.dtype != dtype or tuple(out.shape) != tuple(shape):
        raise ValueError(
            f"out for {info.name!r} is {out.dtype} {tuple(out.shape)}, needs {dtype} {tuple(shape)}"
        )
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out for {info.name!r} must be a contiguous CPU tensor")
    return out.reshape(-1).view(torch.uint8)


def _check_info(source: CheckpointSource, info: TensorInfo) -> None:
    expected = math.prod(info.shape) * DTYPE_SIZES.get(info.dtype, 0)
    if info.dtype not in DTYPE_SIZES or info.nbytes != expected or info.begin < 0:
        raise CheckpointError(
            f"tensor {info.name!r} of {file_label(source, info.file)}: {info.dtype} {list(info.shape)} "
            f"does not fit bytes {info.begin}..{info.end}"
        )


def read_tensor(
    source: CheckpointSource, info: TensorInfo, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensor ``info`` describes, in its stored dtype and shape; reads only its bytes.

    ``out`` (a contiguous CPU tensor of the right dtype and shape, e.g. pinned memory)
    is filled and returned instead of allocating.
    """
    _check_info(source, info)
    buffer = _byte_buffer(info, info.nbytes, info.shape, out)
    _read_bytes_into(source, info.file, info.begin, buffer)
    if out is not None:
        return out
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)


def read_rows(
    source: CheckpointSource,
    info: TensorInfo,
    start: int,
    stop: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``start:stop`` of the tensor (along dim 0), shape ``(stop - start, *shape[1:])``.

    For merging a large tensor in chunks: reads only those rows' bytes.
    """
    _check_info(source, info)
    if not info.shape:
        raise ValueError(f"tensor {info.name!r} is a scalar; it has no rows")
    rows = info.shape[0]
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows {start}:{stop} are outside tensor {info.name!r} of {rows} rows")
    row_bytes = math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]
    shape = (stop - start, *info.shape[1:])
    buffer = _byte_buffer(info, (stop - start) * row_bytes, shape, out)
    _read_bytes_into(source, info.file, info.begin + start * row_bytes, buffer)
    if out is not None:
        return out
    return buffer.view(torch_dtype(info.dtype)).reshape(shape)
