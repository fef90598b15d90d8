"""Checkpoints on any backend: find the weight files, read headers and tensors, write shards.

Everything here speaks only ``CheckpointSource`` / ``OutputSink``; the S3 backend
(``storage/s3/``) is a second implementation of those two, chosen by ``open_source`` and
``open_output`` for ``s3://`` references.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import astuple
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

import torch

from orchestrator.errors import CheckpointError, MergeError, OutputError
from orchestrator.storage.base import (
    DTYPE_SIZES,
    CheckpointSource,
    FileFingerprint,
    OutputSink,
    StorageOptions,
    TensorInfo,
)
from orchestrator.storage.local import LocalCheckpoint, LocalOutput
from orchestrator.storage.safetensors_format import (
    aligned_order,
    build_header,
    dtype_code,
    header_length,
    parse_header,
    torch_dtype,
)

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles a training run leaves beside the weights; they are not weights.
_NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|rng_state.*\.pth|scaler\.pt)$")
CONVERTED_MARK = ".mergefleet-converted.json"
"""Written last into a converted pickle checkpoint: the conversion is complete."""


def default_scratch() -> Path:
    """Where converted pickle checkpoints are cached: $XDG_CACHE_HOME/mergefleet/converted."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mergefleet" / "converted"

FIRST_READ = 64 * 1024
"""Bytes fetched by the first read of a header; a longer header takes one more read."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ---------------------------------------------------------------- opening


def open_source(ref: str | os.PathLike[str], *, storage: StorageOptions | None = None) -> CheckpointSource:
    """A checkpoint from a reference: a local directory or ``s3://bucket/prefix``.

    ``storage`` (the plan's ``fleet.storage``) configures object storage; ``None`` leaves
    everything to the environment.
    """
    text = os.fspath(ref)
    match = _SCHEME.match(text)
    if match is None:
        return LocalCheckpoint(text)
    if match.group(1).lower() == "s3":
        from orchestrator.storage.s3.source import S3Checkpoint

        return S3Checkpoint(text, options=storage)
    raise CheckpointError(
        f"cannot read {text}: unsupported scheme {match.group(1)!r}; "
        "give a local directory or an s3:// URI"
    )


def open_output(ref: str | os.PathLike[str], *, storage: StorageOptions | None = None) -> OutputSink:
    """An output location from a reference: a local directory or ``s3://bucket/prefix``."""
    text = os.fspath(ref)
    match = _SCHEME.match(text)
    if match is None:
        return LocalOutput(text)
    if match.group(1).lower() == "s3":
        from orchestrator.storage.s3.sink import S3Output

        return S3Output(text, options=storage)
    raise OutputError(
        f"cannot write to {text}: unsupported scheme {match.group(1)!r}; "
        "give a local directory or an s3:// URI"
    )


def open_checkpoint(
    ref: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    scratch: str | os.PathLike[str] | None = None,
    storage: StorageOptions | None = None,
) -> CheckpointSource:
    """``open_source``, plus the ``--allow-pickle`` path: a pickle-only checkpoint is
    converted once to safetensors under ``scratch`` (default ``~/.cache/mergefleet/converted``)
    and the converted copy is returned. Without ``allow_pickle`` it is refused."""
    source = open_source(ref, storage=storage)
    pickles = pickle_weight_files(source)
    if not pickles:
        return source
    if not allow_pickle:
        weight_files(source)  # raises the "holds only a pickle checkpoint" error
    identity = json.dumps(
        [source.uri, [astuple(source.fingerprint(f)) for f in pickles]]
    ).encode()
    name = Path(source.uri.rstrip("/")).name or "checkpoint"
    dest = Path(scratch or default_scratch()) / f"{name}-{hashlib.sha256(identity).hexdigest()[:16]}"
    if (dest / CONVERTED_MARK).is_file():
        log.info("using the safetensors conversion of %s in %s", source.uri, dest)
        return LocalCheckpoint(dest)
    log.warning(
        "loading the pickle checkpoint %s with torch.load(weights_only=True) (allow_pickle); "
        "converting it to safetensors in %s",
        source.uri,
        dest,
    )
    return convert_pickle_checkpoint(source, dest)


def describe_version(version: str) -> str:
    """A fingerprint's version for a message: ``etag:…`` → ``ETag …``."""
    kind, sep, value = version.partition(":")
    return f"{'ETag' if kind == 'etag' else kind} {value}" if sep else version


def _label(source: CheckpointSource | OutputSink, file: str) -> str:
    return f"{source.uri.rstrip('/')}/{file}"


def _read_json(source: CheckpointSource, file: str) -> Any:
    try:
        return json.loads(source.read_file(file))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{_label(source, file)} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------- which files hold the weights


def _top_level(source: CheckpointSource) -> list[str]:
    return [f for f in source.list_files() if "/" not in f]


def read_weight_map(source: CheckpointSource) -> dict[str, str] | None:
    """The ``weight_map`` (tensor → file) of ``model.safetensors.index.json``, or ``None``
    when the checkpoint has no index. Every file it names is checked to exist."""
    if not source.exists(SAFE_INDEX):
        return None
    label = _label(source, SAFE_INDEX)
    index = _read_json(source, SAFE_INDEX)
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{label} has no \"weight_map\"; it is not a sharded-checkpoint index")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"the \"weight_map\" of {label} must map tensor names to file names")
    checked: set[str] = set()
    for name, file in weight_map.items():
        if file in checked:
            continue
        if "/" in file or file in ("", ".", "..") or not source.exists(file):
            raise CheckpointError(
                f"{label} maps {name!r} to {file}, which is missing from {source.uri}; "
                "the checkpoint is incomplete (download every shard)"
            )
        checked.add(file)
    return weight_map


def pickle_weight_files(source: CheckpointSource) -> list[str]:
    """The pickle weight files of a checkpoint that has no safetensors weights, else ``[]``.

    With an index (``pytorch_model.bin.index.json``) the list is the index followed by
    the files it names.
    """
    files = _top_level(source)
    if any(f.endswith(".safetensors") for f in files) or SAFE_INDEX in files:
        return []
    if PICKLE_INDEX in files:
        index = _read_json(source, PICKLE_INDEX)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{_label(source, PICKLE_INDEX)} has no \"weight_map\"")
        return [PICKLE_INDEX, *sorted(set(index["weight_map"].values()))]
    if PICKLE_WEIGHTS in files:
        return [PICKLE_WEIGHTS]
    return sorted(f for f in files if f.endswith(PICKLE_SUFFIXES) and not _NOT_WEIGHTS.match(f))


def weight_files(source: CheckpointSource) -> list[str]:
    """The safetensors files holding the checkpoint's weights, in reading order.

    ``model.safetensors``; else the files of ``model.safetensors.index.json``; else every
    top-level ``*.safetensors``. A pickle-only checkpoint is refused (see
    ``convert_pickle_checkpoint``).
    """
    if source.exists(SAFE_WEIGHTS):
        return [SAFE_WEIGHTS]
    weight_map = read_weight_map(source)
    if weight_map is not None:
        if not weight_map:
            raise CheckpointError(f"{_label(source, SAFE_INDEX)} has an empty \"weight_map\"")
        return sorted(set(weight_map.values()))
    files = _top_level(source)
    safetensors = sorted(f for f in files if f.endswith(".safetensors"))
    if safetensors:
        return safetensors
    pickles = pickle_weight_files(source)
    if pickles:
        raise CheckpointError(
            f"{source.uri} holds only a pickle checkpoint ({pickles[0]}); pickle can run "
            "code when loaded. Convert it to safetensors, or pass --allow-pickle to load "
            "it with torch.load(weights_only=True)"
        )
    shown = ", ".join(files[:10]) + (", …" if len(files) > 10 else "") if files else "nothing"
    raise CheckpointError(
        f"{source.uri} holds no weights: no {SAFE_WEIGHTS}, {SAFE_INDEX} or *.safetensors "
        f"file (it holds {shown})"
    )


# ---------------------------------------------------------------- headers and config


def read_header(source: CheckpointSource, file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """One file's tensors (absolute offsets) and metadata, in at most two ranged reads."""
    label = _label(source, file)
    size = source.size(file)
    first = source.read_range(file, 0, min(size, FIRST_READ))
    n = header_length(first[:8], file_size=size, file_label=label)
    if 8 + n <= len(first):
        header = first[8 : 8 + n]
    else:
        header = bytes(first[8:]) + bytes(source.read_range(file, len(first), 8 + n))
    return parse_header(header, data_size=size - 8 - n, file_label=label, file=file)


def read_tensor_index(source: CheckpointSource) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by name, from the headers alone.

    A tensor in two files, or a disagreement between the index's ``weight_map`` and
    the files' headers, is an error.
    """
    files = weight_files(source)
    weight_map = read_weight_map(source) if SAFE_WEIGHTS not in files else None
    index: dict[str, TensorInfo] = {}
    for file in files:
        tensors, _metadata = read_header(source, file)
        for name, info in tensors.items():
            if name in index:
                raise CheckpointError(
                    f"tensor {name!r} is in both {_label(source, index[name].file)} and "
                    f"{_label(source, file)}; the checkpoint is inconsistent"
                )
            if weight_map is not None and weight_map.get(name) != file:
                where = weight_map.get(name)
                said = f"puts it in {where}" if where else "does not list it"
                raise CheckpointError(
                    f"tensor {name!r} is in {_label(source, file)} but "
                    f"{_label(source, SAFE_INDEX)} {said}; the index does not match the files"
                )
            index[name] = info
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in index:
                raise CheckpointError(
                    f"{_label(source, SAFE_INDEX)} puts tensor {name!r} in {file}, but "
                    f"{_label(source, file)} has no such tensor; the index does not match the files"
                )
    return index


def fingerprints(source: CheckpointSource) -> list[FileFingerprint]:
    """What identifies this version of the checkpoint: its weight files, the index when
    one is used, and config.json; sorted by file name."""
    files = set(weight_files(source))
    if SAFE_WEIGHTS not in files and source.exists(SAFE_INDEX):
        files.add(SAFE_INDEX)
    if source.exists("config.json"):
        files.add("config.json")
    return [source.fingerprint(f) for f in sorted(files)]


def read_config(source: CheckpointSource) -> dict[str, Any]:
    """The checkpoint's ``config.json``."""
    if not source.exists("config.json"):
        raise CheckpointError(
            f"{_label(source, 'config.json')} is missing; every checkpoint needs the "
            "config.json that describes its architecture"
        )
    config = _read_json(source, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{_label(source, 'config.json')} is not a JSON object")
    return config


# ---------------------------------------------------------------- tensor data


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
            f"{_label(source, file)}: asked for bytes {begin}..{begin + n}, got {len(data)} bytes; "
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
            f"tensor {info.name!r} of {_label(source, info.file)}: {info.dtype} {list(info.shape)} "
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


# ---------------------------------------------------------------- writing


def _finite_mask(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return torch.isfinite(tensor)
    except (RuntimeError, NotImplementedError):  # e.g. float8_e4m3fn has no isfinite
        return torch.isfinite(tensor.float())


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one reduction: a NaN or Inf anywhere makes the sum
    NaN or Inf, so a finite sum proves it (an overflowing sum falls back to the mask)."""
    try:
        if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
            return True
    except (RuntimeError, NotImplementedError):  # e.g. float8 types have no sum
        pass
    return bool(_finite_mask(tensor).all())


def check_tensor_for_write(
    name: str,
    tensor: torch.Tensor,
    expected_dtype: str | torch.dtype,
    expected_shape: Sequence[int],
) -> torch.Tensor:
    """The one guard before writing: the tensor as a contiguous CPU tensor, or a clear error.

    Checks the dtype and shape against the header entry and that every value is finite.
    """
    if not isinstance(tensor, torch.Tensor):
        raise MergeError(f"merged tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    dtype = torch_dtype(expected_dtype) if isinstance(expected_dtype, str) else expected_dtype
    if tensor.dtype != dtype:
        raise MergeError(
            f"merged tensor {name!r} is {tensor.dtype} but the file declares {dtype}; "
            f"cast it with .to({dtype}) before writing"
        )
    if tuple(tensor.shape) != tuple(expected_shape):
        raise MergeError(
            f"merged tensor {name!r} has shape {tuple(tensor.shape)} but the file declares "
            f"{tuple(expected_shape)}; the merge changed the tensor's shape"
        )
    if tensor.is_floating_point() and not _all_finite(tensor):
        finite = _finite_mask(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise MergeError(
                f"merged tensor {name!r} contains NaN/Inf ({bad} of {tensor.numel()} values); "
                "check the inputs and parameters (e.g. weights summing to 0 with normalize)"
            )
    return tensor.detach().cpu().contiguous()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Streams one safetensors file into an ``OutputSink``: header first, then each
    tensor's bytes as it is produced, in the header's order.

    ::

        with SafetensorsWriter(sink, "model-00001-of-00002.safetensors", entries, metadata) as w:
            for name, dtype, shape in entries:
                w.write(name, merged_tensor)
        w.sha256, w.bytes_written

    The file appears under its final name only if every tensor was written and the
    block exits cleanly; otherwise nothing is left behind.
    """

    def __init__(
        self,
        sink: OutputSink,
        file: str,
        entries: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.sink = sink
        self.file = file
        self.entries = [(name, code, tuple(shape)) for name, code, shape in entries]
        self.prefix, self.offsets = build_header(self.entries, metadata)
        self.sha256: str | None = None
        self.bytes_written = 0
        self._hash = hashlib.sha256()
        self._next = 0
        self._context: Any = None
        self._stream: BinaryIO | None = None

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._stream is not None
        self._stream.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)

    def __enter__(self) -> SafetensorsWriter:
        self._context = self.sink.open_write(self.file)
        self._stream = self._context.__enter__()
        try:
            self._emit(self.prefix)
        except BaseException as exc:
            self._context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; ``name`` must be the next entry of the header."""
        if self._stream is None:
            raise RuntimeError("use SafetensorsWriter in a with block")
        if self._next >= len(self.entries):
            raise MergeError(f"tensor {name!r} is not declared in the header of {self.file}")
        expected_name, code, shape = self.entries[self._next]
        if name != expected_name:
            raise MergeError(
                f"{self.file}: got tensor {name!r} but the header's next tensor is "
                f"{expected_name!r}; tensors must be written in header order"
            )
        tensor = check_tensor_for_write(name, tensor, code, shape)
        data = _tensor_bytes(tensor)
        begin, end = self.offsets[self._next]
        if len(data) != end - begin:  # guaranteed by the dtype and shape checks
            raise MergeError(f"tensor {name!r} is {len(data)} bytes, the header says {end - begin}")
        self._emit(data)
        self._next += 1

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        context, self._stream = self._context, None
        if exc is None and self._next < len(self.entries):
            missing = [name for name, _, _ in self.entries[self._next :]]
            exc = MergeError(
                f"{self.file} is incomplete: {len(missing)} tensor(s) were not written, "
                f"starting with {missing[0]!r}"
            )
            try:
                context.__exit__(MergeError, exc, None)
            finally:
                raise exc
        context.__exit__(exc_type, exc, tb)
        if exc is None:
            self.sha256 = self._hash.hexdigest()
        return False


def write_safetensors(
    sink: OutputSink,
    file: str,
    entries: Sequence[tuple[str, str, Sequence[int]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """Write ``file`` from ``(name, tensor)`` pairs produced lazily in ``entries``' order.

    Returns ``(sha256 hex of the file, bytes written)``. If ``tensors`` raises midway,
    the file does not appear.
    """
    with SafetensorsWriter(sink, file, entries, metadata) as writer:
        for name, tensor in tensors:
            writer.write(name, tensor)
    assert writer.sha256 is not None
    return writer.sha256, writer.bytes_written


# ---------------------------------------------------------------- pickle checkpoints


def _load_pickle_state_dict(source: CheckpointSource, file: str) -> dict[str, torch.Tensor]:
    path = _label(source, file)
    try:
        if isinstance(source, LocalCheckpoint):
            try:  # mmap keeps the loaded shard out of resident memory
                state = torch.load(source.root / file, weights_only=True, map_location="cpu", mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be mmapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(source.root / file, weights_only=True, map_location="cpu")
        else:
            data = io.BytesIO(source.read_file(file))
            state = torch.load(data, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means "refused"
        raise CheckpointError(
            f"{path} could not be loaded with torch.load(weights_only=True): {exc}; it may hold "
            "objects other than tensors, which mergefleet will not unpickle"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}; a weights file must map "
                "tensor names to tensors"
            )
    return state


def convert_pickle_checkpoint(
    source_dir: str | os.PathLike[str] | CheckpointSource, dest_dir: str | os.PathLike[str]
) -> LocalCheckpoint:
    """Convert a pickle checkpoint to safetensors in the local ``dest_dir`` and open it.

    Only for ``--allow-pickle``: each weight file is loaded with
    ``torch.load(weights_only=True, map_location="cpu")``. One weight file becomes
    ``model.safetensors``; several become ``model-0000i-of-0000N.safetensors`` with a
    ``model.safetensors.index.json``. Every other top-level file that is not a pickle
    (config.json, tokenizer files, …) is copied. A marker file is written last, so a
    directory without it is an unfinished conversion.
    """
    if isinstance(source_dir, (str, os.PathLike)):
        source: CheckpointSource = LocalCheckpoint(source_dir)
    else:
        source = source_dir
    dest = LocalOutput(dest_dir)
    dest.delete(CONVERTED_MARK)
    if isinstance(source, LocalCheckpoint) and Path(dest.uri).resolve() == source.root.resolve():
        raise OutputError(f"convert {source.uri} into another directory, not into itself")
    files = pickle_weight_files(source)
    if not files:
        raise CheckpointError(f"{source.uri} holds no pickle weights to convert")
    weights = [f for f in files if f != PICKLE_INDEX]
    for file in weights:
        if not source.exists(file):
            raise CheckpointError(
                f"{_label(source, PICKLE_INDEX)} names {file}, which is missing from {source.uri}"
            )

    count = len(weights)
    weight_map: dict[str, str] = {}  # tensor -> new file
    came_from: dict[str, str] = {}  # tensor -> pickle file
    total = 0
    for i, file in enumerate(weights):
        state = _load_pickle_state_dict(source, file)
        out_name = SAFE_WEIGHTS if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        for name in state:
            if name in came_from:
                raise CheckpointError(
                    f"tensor {name!r} is in both {_label(source, came_from[name])} "
                    f"and {_label(source, file)}"
                )
            came_from[name] = file
            weight_map[name] = out_name
        entries = aligned_order([(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in state.items()])
        write_safetensors(
            dest,
            out_name,
            entries,
            ((n, state[n]) for n, _, _ in entries),
            metadata={"format": "pt", "converted_from": file},
        )
        total += sum(t.numel() * t.element_size() for t in state.values())
        log.info("converted %s to %s (%d tensors)", _label(source, file), out_name, len(entries))
        del state

    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        dest.write_file(SAFE_INDEX, (json.dumps(index, indent=2) + "\n").encode())
    skipped = set(files)
    for file in _top_level(source):
        if file in skipped or file.endswith(PICKLE_SUFFIXES) or file.endswith(".safetensors"):
            continue
        dest.write_file(file, source.read_file(file))
    marker = {"converted_from": source.uri, "files": weights}
    dest.write_file(CONVERTED_MARK, (json.dumps(marker, indent=1) + "\n").encode())
    return LocalCheckpoint(dest.uri)
