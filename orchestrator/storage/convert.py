"""Pickle checkpoints (``.bin``, ``.pt``), only when the user opts in (``--allow-pickle``):
each is loaded once with ``torch.load(weights_only=True)`` and converted to safetensors in
a local cache, and the merge reads the converted copy."""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import astuple
from pathlib import Path

import torch

from orchestrator.cache import cache_dir
from orchestrator.errors import CheckpointError, OutputError
from orchestrator.hashing import stable_hash
from orchestrator.storage.base import CheckpointSource, StorageOptions
from orchestrator.storage.checkpoint import (
    PICKLE_INDEX,
    PICKLE_SUFFIXES,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    file_label,
    open_source,
    pickle_weight_files,
    shard_file_name,
    top_level_files,
    weight_files,
)
from orchestrator.storage.local import LocalCheckpoint, LocalOutput
from orchestrator.storage.safetensors_format import aligned_order, dtype_code
from orchestrator.storage.writer import write_safetensors

log = logging.getLogger(__name__)

CONVERTED_MARK = ".mergefleet-converted.json"
"""Written last into a converted pickle checkpoint: the conversion is complete."""


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
    identity = stable_hash([source.uri, [astuple(source.fingerprint(f)) for f in pickles]], length=16)
    name = Path(source.uri.rstrip("/")).name or "checkpoint"
    dest = Path(scratch or cache_dir("converted")) / f"{name}-{identity}"
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


def _load_pickle_state_dict(source: CheckpointSource, file: str) -> dict[str, torch.Tensor]:
    path = file_label(source, file)
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


def convert_pickle_checkpoint(source: CheckpointSource, dest_dir: str | os.PathLike[str]) -> LocalCheckpoint:
    """Convert a pickle checkpoint to safetensors in the local ``dest_dir`` and open it.

    Only for ``--allow-pickle``: each weight file is loaded with
    ``torch.load(weights_only=True, map_location="cpu")``. One weight file becomes
    ``model.safetensors``; several become ``model-0000i-of-0000N.safetensors`` with a
    ``model.safetensors.index.json``. Every other top-level file that is not a pickle
    (config.json, tokenizer files, …) is copied. A marker file is written last, so a
    directory without it is an unfinished conversion.
    """
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
                f"{file_label(source, PICKLE_INDEX)} names {file}, which is missing from {source.uri}"
            )

    count = len(weights)
    weight_map: dict[str, str] = {}  # tensor -> new file
    came_from: dict[str, str] = {}  # tensor -> pickle file
    total = 0
    for i, file in enumerate(weights):
        state = _load_pickle_state_dict(source, file)
        out_name = SAFE_WEIGHTS if count == 1 else shard_file_name(i, count)
        for name in state:
            if name in came_from:
                raise CheckpointError(
                    f"tensor {name!r} is in both {file_label(source, came_from[name])} "
                    f"and {file_label(source, file)}"
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
        log.info("converted %s to %s (%d tensors)", file_label(source, file), out_name, len(entries))
        del state

    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        dest.write_file(SAFE_INDEX, (json.dumps(index, indent=2) + "\n").encode())
    skipped = set(files)
    for file in top_level_files(source):
        if file in skipped or file.endswith(PICKLE_SUFFIXES) or file.endswith(".safetensors"):
            continue
        dest.write_file(file, source.read_file(file))
    marker = {"converted_from": source.uri, "files": weights}
    dest.write_file(CONVERTED_MARK, (json.dumps(marker, indent=1) + "\n").encode())
    return LocalCheckpoint(dest.uri)
