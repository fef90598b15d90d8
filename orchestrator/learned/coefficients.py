"""The DAM coefficient file: what ``mergefleet dam train`` writes and ``dam_apply`` reads.

A safetensors file with one float32 tensor per checkpoint tensor, named like it, of shape
``(experts, shape[-1])``: row i holds expert i's coefficients along the tensor's last
dimension (a linear layer's input columns, an embedding's dimensions, a norm's elements).
Its metadata says which experts, in which order (``mergefleet_dam_experts``, JSON).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from orchestrator.errors import OutputError, RecipeError
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import StorageOptions

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
EXPERTS_KEY = "mergefleet_dam_experts"


@dataclass(frozen=True)
class Coefficients:
    uri: str
    tensors: Mapping[str, torch.Tensor]  # name -> (experts, shape[-1]) float32
    experts: tuple[str, ...]  # as the training recipe named them, in row order


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/c.safetensors`` -> (``s3://b/p``, ``c.safetensors``); a local path likewise."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    if not name.endswith(".safetensors"):
        raise RecipeError(f"coefficients: '{uri}' must name a .safetensors file")
    return folder or ".", name


def encode(tensors: Mapping[str, torch.Tensor], experts: Sequence[str], extra: Mapping[str, str] | None = None) -> bytes:
    metadata = {"format": "pt", "mergefleet_dam": FORMAT_VERSION, EXPERTS_KEY: json.dumps(list(experts))} | dict(extra or {})
    return save_safetensors({name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}, metadata=metadata)


def write_coefficients(
    uri: str,
    tensors: Mapping[str, torch.Tensor],
    experts: Sequence[str],
    *,
    extra: Mapping[str, str] | None = None,
    overwrite: bool = False,
    storage: StorageOptions | None = None,
) -> str:
    """Write the coefficient file at ``uri`` (local path or s3://); refuses an existing file
    unless ``overwrite``."""
    folder, name = split_uri(uri)
    sink = ckpt.open_output(folder, storage=storage)
    if sink.exists(name) and not overwrite:
        raise OutputError(f"{uri} already exists; pass --overwrite to replace it, or choose another coefficients path")
    sink.write_file(name, encode(tensors, experts, extra))
    return uri


def _version(uri: str, storage: StorageOptions | None) -> str:
    folder, name = split_uri(uri)
    source = ckpt.open_source(folder, storage=storage)
    if not source.exists(name):
        raise RecipeError(f"coefficients file {uri} does not exist; train it with 'mergefleet dam train RECIPE'")
    fingerprint = source.fingerprint(name)
    return f"{fingerprint.size}:{fingerprint.version}"


@functools.lru_cache(maxsize=8)
def _load(uri: str, version: str, storage: StorageOptions | None) -> Coefficients:
    folder, name = split_uri(uri)
    data = ckpt.open_source(folder, storage=storage).read_file(name)
    try:
        tensors = load_safetensors(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
        experts = tuple(json.loads(metadata[EXPERTS_KEY]))
    except (ValueError, KeyError, TypeError) as error:
        raise RecipeError(f"coefficients file {uri} is not a DAM coefficient file ({type(error).__name__}: {error})") from None
    return Coefficients(uri=uri, tensors=tensors, experts=experts)


def read_coefficients(uri: str, *, storage: StorageOptions | None = None) -> Coefficients:
    """The coefficient file at ``uri``, read once per process while it does not change."""
    return _load(uri, _version(uri, storage), storage)


def check_entry(coefficients: Coefficients, tensor: str, shape: Sequence[int], experts: int) -> torch.Tensor:
    """The entry of ``tensor``, after checking it is there with shape (experts, shape[-1])."""
    entry = coefficients.tensors.get(tensor)
    expected = (experts, int(shape[-1]) if shape else 1)
    if entry is None:
        raise RecipeError(
            f"coefficients file {coefficients.uri} has no entry for tensor '{tensor}'; "
            "train the coefficients on the same models (mergefleet dam train RECIPE)"
        )
    if tuple(entry.shape) != expected:
        raise RecipeError(
            f"coefficients file {coefficients.uri}: tensor '{tensor}' has coefficients of shape {list(entry.shape)}, "
            f"the merge needs {list(expected)} ({experts} model(s) × its last dimension)"
        )
    return entry


def check_experts(coefficients: Coefficients, models: Sequence[str]) -> None:
    """The merge lists the same models, in the order the coefficients were trained for."""
    trained = list(coefficients.experts)
    if len(trained) != len(models):
        raise RecipeError(
            f"coefficients file {coefficients.uri} was trained for {len(trained)} model(s) ({', '.join(trained)}), "
            f"the merge has {len(models)}; list the same models (and no base_model) in the recipe"
        )
    if sorted(trained) == sorted(models) and trained != list(models):
        raise RecipeError(
            f"coefficients file {coefficients.uri} was trained with the models in the order {', '.join(trained)}; "
            "list them in that order in the recipe"
        )
    if trained != list(models):
        _warn_once(f"coefficients file {coefficients.uri} was trained on {', '.join(trained)}; the merge reads "
                   f"{', '.join(models)} in their place (same order)")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)
