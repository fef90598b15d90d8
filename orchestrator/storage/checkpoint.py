"""Checkpoints on any backend: open a reference, find the files that hold the weights,
read headers and config, and say which version of a checkpoint this is (fingerprints).

Everything here speaks only ``CheckpointSource`` / ``OutputSink``; local disk
(``storage/local.py``) and S3 (``storage/s3/``) implement those two, chosen by
``open_source`` and ``open_output`` from the reference's scheme. Reading tensors is
``storage/tensors.py``, writing them ``storage/writer.py``, pickle checkpoints
``storage/convert.py``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, replace
from typing import Any, Literal

from orchestrator.cache import cache_dir
from orchestrator.errors import CheckpointError, OutputError
from orchestrator.hashing import stable_hash
from orchestrator.storage.base import CheckpointSource, FileFingerprint, OutputSink, StorageOptions, TensorInfo
from orchestrator.storage.local import LocalCheckpoint, LocalOutput
from orchestrator.storage.safetensors_format import header_length, parse_header

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles a training run leaves beside the weights; they are not weights.
_NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|rng_state.*\.pth|scaler\.pt)$")

def shard_file_name(index: int, count: int) -> str:
    """The name of weight file ``index`` (from 0) of ``count``, as transformers names them."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


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


def describe_version(version: str) -> str:
    """A fingerprint's version for a message: ``etag:…`` → ``ETag …``."""
    kind, sep, value = version.partition(":")
    return f"{'ETag' if kind == 'etag' else kind} {value}" if sep else version


def file_label(source: CheckpointSource | OutputSink, file: str) -> str:
    return f"{source.uri.rstrip('/')}/{file}"


def read_json(source: CheckpointSource, file: str) -> Any:
    try:
        return json.loads(source.read_file(file))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file_label(source, file)} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------- which files hold the weights


def top_level_files(source: CheckpointSource) -> list[str]:
    return [f for f in source.list_files() if "/" not in f]


def read_weight_map(source: CheckpointSource) -> dict[str, str] | None:
    """The ``weight_map`` (tensor → file) of ``model.safetensors.index.json``, or ``None``
    when the checkpoint has no index. Every file it names is checked to exist."""
    if not source.exists(SAFE_INDEX):
        return None
    label = file_label(source, SAFE_INDEX)
    index = read_json(source, SAFE_INDEX)
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
    files = top_level_files(source)
    if any(f.endswith(".safetensors") for f in files) or SAFE_INDEX in files:
        return []
    if PICKLE_INDEX in files:
        index = read_json(source, PICKLE_INDEX)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{file_label(source, PICKLE_INDEX)} has no \"weight_map\"")
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
            raise CheckpointError(f"{file_label(source, SAFE_INDEX)} has an empty \"weight_map\"")
        return sorted(set(weight_map.values()))
    files = top_level_files(source)
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
    label = file_label(source, file)
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
                    f"tensor {name!r} is in both {file_label(source, index[name].file)} and "
                    f"{file_label(source, file)}; the checkpoint is inconsistent"
                )
            if weight_map is not None and weight_map.get(name) != file:
                where = weight_map.get(name)
                said = f"puts it in {where}" if where else "does not list it"
                raise CheckpointError(
                    f"tensor {name!r} is in {file_label(source, file)} but "
                    f"{file_label(source, SAFE_INDEX)} {said}; the index does not match the files"
                )
            index[name] = info
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in index:
                raise CheckpointError(
                    f"{file_label(source, SAFE_INDEX)} puts tensor {name!r} in {file}, but "
                    f"{file_label(source, file)} has no such tensor; the index does not match the files"
                )
    return index


VerifyInputs = Literal["metadata", "content"]
"""How an input's version is checked (``fleet.verify_inputs``): size, mtime or ETag and the
safetensors header (``metadata``, cheap), or also the hash of every byte (``content``)."""


def fingerprints(source: CheckpointSource, *, verify: VerifyInputs = "metadata") -> list[FileFingerprint]:
    """What identifies this version of the checkpoint: its weight files, the index when
    one is used, and config.json; sorted by file name. With ``verify="content"`` a local
    file's fingerprint carries its content hash (cached, see ``LocalCheckpoint.content_hash``);
    an object on S3 is identified by its ETag already."""
    files = set(weight_files(source))
    if SAFE_WEIGHTS not in files and source.exists(SAFE_INDEX):
        files.add(SAFE_INDEX)
    if source.exists("config.json"):
        files.add("config.json")
    prints = [source.fingerprint(f) for f in sorted(files)]
    if verify == "content" and isinstance(source, LocalCheckpoint):
        cache = cache_dir("fingerprints")
        prints = [replace(fp, content=source.content_hash(fp.file, cache)) for fp in prints]
    return prints


def verify_level(recorded: list[dict[str, Any]]) -> VerifyInputs:
    """The check that made ``recorded`` fingerprints, so the same check is made again."""
    return "content" if any(fp.get("content") for fp in recorded) else "metadata"


def read_config(source: CheckpointSource) -> dict[str, Any]:
    """The checkpoint's ``config.json``."""
    if not source.exists("config.json"):
        raise CheckpointError(
            f"{file_label(source, 'config.json')} is missing; every checkpoint needs the "
            "config.json that describes its architecture"
        )
    config = read_json(source, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{file_label(source, 'config.json')} is not a JSON object")
    return config


def fingerprint_digest(uri: str, prints: list[dict[str, Any]]) -> str:
    """One hash for one version of a checkpoint: its location and its files' fingerprints.

    The evaluation cache keys scores by it and MLflow records it as each input's digest,
    so a score and a run input of the same checkpoint version carry the same value.
    """
    return stable_hash([uri, prints])


def checkpoint_digest(source: CheckpointSource) -> str:
    """``fingerprint_digest`` of a checkpoint as it is now."""
    return fingerprint_digest(source.uri, [asdict(fp) for fp in fingerprints(source)])
