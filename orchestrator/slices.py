"""The output model as slices of input layers, and the list of output tensors it implies.

A ``models:`` recipe is one slice covering every layer of every model (the base added
when it is not listed), as in mergekit; a ``slices:`` recipe lists its slices, which may
repeat or drop layers (a frankenmerge). Either way each output tensor names the input
tensors it is merged from, which model is the base, and the parameter settings that
apply to it, so the plan can resolve everything per tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator.errors import CheckpointError, RecipeError
from orchestrator.parameters import layer_index
from orchestrator.recipe import Recipe

Settings = Mapping[str, Any]

_LAYER_NUMBER = re.compile(r"((?:^|\.)(?:layers|h|blocks|block|layer)\.)(\d+)(\.)")


def rename_layer(name: str, index: int) -> str:
    """``model.layers.7.mlp.up_proj.weight`` with its layer number replaced by ``index``."""
    return _LAYER_NUMBER.sub(lambda m: f"{m.group(1)}{index}{m.group(3)}", name, count=1)


def is_embedding(name: str) -> bool:
    return any(part in name for part in ("embed", "wte", "wpe", "word_embeddings"))


@dataclass(frozen=True)
class SourceLayers:
    model: str
    start: int
    stop: int
    settings: Settings


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SourceLayers, ...]
    base: str | None
    settings: Settings

    @property
    def layers(self) -> int:
        return self.sources[0].stop - self.sources[0].start


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: where its inputs come from and which settings apply."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (model, input tensor name), in source order
    base: str | None  # the model whose tensor is the base, if the method takes one
    model_settings: tuple[tuple[Settings, ...], ...]  # per input: settings, highest precedence first
    shared_settings: tuple[Settings, ...]
    t: float  # position within its slice, for gradients
    group: str  # "pre", "layer N" or "post": the atoms the shard cut keeps together


def output_slices(recipe: Recipe, num_layers: Mapping[str, int]) -> list[OutputSlice]:
    """The recipe's slices, checked against the models' layer counts."""
    if not recipe.slices:
        sources = [SourceLayers(entry.model, 0, num_layers[entry.model], entry.parameters) for entry in recipe.models]
        if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
            sources.append(SourceLayers(recipe.base_model, 0, num_layers[recipe.base_model], {}))
        lengths = {s.stop - s.start for s in sources}
        if len(lengths) > 1:
            counts = ", ".join(f"{s.model}: {s.stop}" for s in sources)
            raise CheckpointError(
                f"the models have different numbers of layers ({counts}); use 'slices:' to say which layers to merge"
            )
        return [OutputSlice(tuple(sources), recipe.base_model, {})]

    result = []
    for i, entry in enumerate(recipe.slices):
        sources = []
        for source in entry.sources:
            start, stop = source.layer_range
            available = num_layers[source.model]
            if not 0 <= start < stop <= available:
                raise RecipeError(
                    f"slices[{i}]: layer_range [{start}, {stop}] of {source.model} is outside its {available} layers; "
                    f"use a range within [0, {available}] with start < end"
                )
            sources.append(SourceLayers(source.model, start, stop, source.parameters))
        lengths = {s.stop - s.start for s in sources}
        if len(lengths) > 1:
            raise RecipeError(f"slices[{i}]: every source must cover the same number of layers, got {sorted(lengths)}")
        result.append(OutputSlice(tuple(sources), entry.base_model or recipe.base_model, entry.parameters))
    return result


def _layer_tensors(names: list[str]) -> tuple[list[str], dict[int, list[str]], list[str]]:
    pre = sorted(n for n in names if layer_index(n) is None and is_embedding(n))
    post = sorted(n for n in names if layer_index(n) is None and not is_embedding(n))
    layers: dict[int, list[str]] = {}
    for name in names:
        index = layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append(name)
    return pre, layers, post


def _same_names(where: str, reference: str, ref_names: list[str], model: str, names: list[str]) -> None:
    missing = sorted(set(ref_names) - set(names))
    if missing:
        raise CheckpointError(
            f"{model} lacks tensor '{missing[0]}' that {reference} has"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" ({where}); the models must have the same tensors"
        )
    extra = sorted(set(names) - set(ref_names))
    if extra:
        raise CheckpointError(
            f"{model} has tensor '{extra[0]}' that {reference} lacks"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f" ({where}); the models must have the same tensors"
        )


def output_tensors(
    slices: list[OutputSlice],
    names_by_model: Mapping[str, list[str]],
    top_level: Settings,
) -> list[OutputTensor]:
    """Every output tensor in checkpoint order: embeddings, each output layer, the rest."""
    split = {model: _layer_tensors(names) for model, names in names_by_model.items()}

    def settings(slice_: OutputSlice, source: SourceLayers) -> tuple[Settings, ...]:
        return (source.settings, slice_.settings, top_level)

    def edge(slice_: OutputSlice, part: int, group: str) -> list[OutputTensor]:
        reference = slice_.sources[0].model
        ref_names = split[reference][part]
        for source in slice_.sources[1:]:
            _same_names("outside the layers", reference, ref_names, source.model, split[source.model][part])
        return [
            OutputTensor(
                name=name,
                inputs=tuple((s.model, name) for s in slice_.sources),
                base=slice_.base,
                model_settings=tuple(settings(slice_, s) for s in slice_.sources),
                shared_settings=(slice_.settings, top_level),
                t=0.0,
                group=group,
            )
            for name in ref_names
        ]

    tensors = edge(slices[0], 0, "pre")
    out_layer = 0
    for slice_ in slices:
        for offset in range(slice_.layers):
            t = offset / (slice_.layers - 1) if slice_.layers > 1 else 1.0
            reference = slice_.sources[0]
            ref_names = split[reference.model][1].get(reference.start + offset, [])
            ref_out = {rename_layer(n, out_layer): n for n in ref_names}
            per_source = []
            for source in slice_.sources:
                names = split[source.model][1].get(source.start + offset, [])
                renamed = {rename_layer(n, out_layer): n for n in names}
                _same_names(f"layer {source.start + offset}", reference.model, list(ref_out), source.model, list(renamed))
                per_source.append(renamed)
            for out_name in sorted(ref_out):
                tensors.append(
                    OutputTensor(
                        name=out_name,
                        inputs=tuple((s.model, renamed[out_name]) for s, renamed in zip(slice_.sources, per_source)),
                        base=slice_.base,
                        model_settings=tuple(settings(slice_, s) for s in slice_.sources),
                        shared_settings=(slice_.settings, top_level),
                        t=t,
                        group=f"layer {out_layer}",
                    )
                )
            out_layer += 1
    tensors += edge(slices[-1], 2, "post")
    return tensors


def output_layer_count(slices: list[OutputSlice]) -> int:
    return sum(s.layers for s in slices)
