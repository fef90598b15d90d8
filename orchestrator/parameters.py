"""Resolving recipe parameter values to one scalar per tensor, as mergekit does.

A value is a scalar, a gradient (a list interpolated across the layers), or a list of
``{filter, value}`` entries where the first matching filter wins. Per-model settings
take precedence over the recipe's top-level ``parameters``.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Mapping, Sequence

from orchestrator.errors import RecipeError
from orchestrator.methods.base import MethodSpec, ParamSpec
from orchestrator.recipe import ConditionalValue, Recipe

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, or None for embeddings, norms, heads."""
    match = _LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_value(value: Any, tensor_name: str, t: float) -> Any:
    """One setting at one tensor: filters first, then gradients, else the scalar."""
    if isinstance(value, ConditionalValue):
        value = [value]
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(entry, ConditionalValue) for entry in value):
            for entry in value:
                if entry.filter in (None, "*") or entry.filter in tensor_name:
                    return evaluate_value(entry.value, tensor_name, t)
            return None
        if all(_is_number(entry) for entry in value):
            scaled = t * (len(value) - 1)
            low = int(scaled)
            high = min(len(value) - 1, low + 1)
            fraction = scaled - low
            return (1 - fraction) * value[low] + fraction * value[high]
        return value[int(t * (len(value) - 1))]
    return value


def coerce(spec: ParamSpec, value: Any, *, where: str) -> Any:
    """Check a resolved value against the parameter's type; name the place when it fails."""
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if spec.name == "rescale" and value == "inverse":
            return value
        raise RecipeError(f"{where}: parameter '{spec.name}' must be true or false, got {value!r}")
    if spec.kind in (float, int):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{where}: parameter '{spec.name}' must be a number, got {value!r}") from None
        if not _is_number(value):
            raise RecipeError(f"{where}: parameter '{spec.name}' must be a number, got {value!r}")
        return spec.kind(value)
    return value


def unused_parameters(recipe: Recipe) -> str | None:
    """One line naming every parameter the recipe sets and its method does not read, or None.

    mergekit ignores them (``weight`` on ``model_stock`` or ``sce``, a merge-wide setting
    under one model), so they are accepted; the line says where each one is and that it is
    ignored, because a typo in a parameter name changes nothing either. An unknown method
    gives None: planning refuses it with the list of methods.
    """
    from orchestrator.methods import METHODS

    method = METHODS.get(recipe.merge_method)
    if method is None:
        return None
    known = {spec.name for spec in (*method.model_params, *method.global_params)}
    model_level = {spec.name for spec in method.model_params}
    unused: list[str] = []
    misplaced: list[str] = []
    for where, settings, per_model in recipe_parameter_scopes(recipe):
        for name in settings:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                unused.append(f"{where}.{name}" + (f" (did you mean '{close[0]}'?)" if close else ""))
            elif per_model and name not in model_level:
                misplaced.append(f"{where}.{name}")
    if not unused and not misplaced:
        return None
    parts = []
    if unused:
        allowed = ", ".join(sorted(known)) or "none"
        parts.append(f"'{method.name}' does not use {', '.join(unused)} (it takes: {allowed})")
    if misplaced:
        parts.append(f"{', '.join(misplaced)} apply to the whole merge and are read only from the top-level 'parameters:'")
    return "; ".join(parts) + "; ignored, as mergekit ignores them"


def recipe_parameter_scopes(recipe: Recipe) -> list[tuple[str, Mapping[str, Any], bool]]:
    """Every place a recipe sets parameters, labelled as the user wrote it."""
    scopes: list[tuple[str, Mapping[str, Any], bool]] = [("parameters", recipe.parameters, False)]
    for i, entry in enumerate(recipe.models):
        scopes.append((f"models[{i}] ({entry.model}).parameters", entry.parameters, True))
    for i, slice_ in enumerate(recipe.slices or []):
        scopes.append((f"slices[{i}].parameters", slice_.parameters, False))
        for j, source in enumerate(slice_.sources):
            scopes.append((f"slices[{i}].sources[{j}] ({source.model}).parameters", source.parameters, True))
    return scopes


def resolve_tensor_parameters(
    method: MethodSpec,
    tensor_name: str,
    t: float,
    shared_settings: Sequence[Mapping[str, Any]],
    model_settings: Sequence[tuple[str, str, Sequence[Mapping[str, Any]]]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and global parameter values for one tensor, defaults applied.

    Each settings sequence is ordered from highest precedence (a slice source's own
    parameters) to lowest (the recipe's top-level ``parameters``); the first that sets a
    value wins. ``model_settings`` holds (model, its input tensor name, settings) per model.
    """
    global_values: dict[str, Any] = {}
    for spec in method.global_params:
        value = _first_value(spec.name, shared_settings, tensor_name, t)
        global_values[spec.name] = _finish(spec, value, where=tensor_name)
    model_values: list[dict[str, Any]] = []
    for model, input_name, chain in model_settings:
        values: dict[str, Any] = {}
        for spec in method.model_params:
            value = _first_value(spec.name, chain, input_name, t)
            values[spec.name] = _finish(spec, value, where=f"model {model}, tensor {tensor_name}")
        model_values.append(values)
    if method.check_params is not None:
        method.check_params(f"tensor '{tensor_name}'", [model for model, _, _ in model_settings], model_values, global_values)
    return model_values, global_values


def _first_value(name: str, chain: Sequence[Mapping[str, Any]], tensor_name: str, t: float) -> Any:
    for settings in chain:
        if name in settings:
            value = evaluate_value(settings[name], tensor_name, t)
            if value is not None:
                return value
    return None


def _finish(spec: ParamSpec, value: Any, *, where: str) -> Any:
    if value is None:
        if spec.required:
            raise RecipeError(
                f"{where}: parameter '{spec.name}' is required and not set; "
                f"set it under the model's 'parameters:' or in the top-level 'parameters:'"
            )
        return spec.default
    return coerce(spec, value, where=where)
