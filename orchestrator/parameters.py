"""Resolving recipe parameter values to one scalar per tensor, as mergekit does.

A value is a scalar, a gradient (a list interpolated across the layers), or a list of
``{filter, value}`` entries where the first matching filter wins. Per-model settings
take precedence over the recipe's top-level ``parameters``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from orchestrator.errors import RecipeError
from orchestrator.methods.base import MethodSpec, ParamSpec
from orchestrator.recipe import ConditionalValue

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, or None for embeddings, norms, heads."""
    match = _LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits for gradients: 0 for non-layer tensors, i/(L-1) for layer i."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return index / (num_layers - 1)


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


def check_parameter_names(
    method: MethodSpec,
    top_level: Mapping[str, Any],
    per_model: Mapping[str, Mapping[str, Any]],
) -> None:
    """Refuse parameters the method does not take: a typo would otherwise be ignored."""
    known = {spec.name for spec in (*method.model_params, *method.global_params)}
    allowed = ", ".join(sorted(known)) or "(none)"
    for name in top_level:
        if name not in known:
            raise RecipeError(f"parameters.{name}: '{method.name}' takes no parameter '{name}'; it takes: {allowed}")
    for model, params in per_model.items():
        for name in params:
            if name not in known:
                raise RecipeError(
                    f"models[{model}].parameters.{name}: '{method.name}' takes no parameter '{name}'; it takes: {allowed}"
                )
            if any(spec.name == name for spec in method.global_params) and not any(
                spec.name == name for spec in method.model_params
            ):
                raise RecipeError(
                    f"models[{model}].parameters.{name}: '{name}' applies to the whole merge; "
                    "move it to the top-level 'parameters:'"
                )


def resolve_tensor_parameters(
    method: MethodSpec,
    tensor_name: str,
    t: float,
    top_level: Mapping[str, Any],
    per_model: Sequence[tuple[str, Mapping[str, Any]]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and global parameter values for one tensor, defaults applied."""
    global_values: dict[str, Any] = {}
    for spec in method.global_params:
        value = evaluate_value(top_level.get(spec.name), tensor_name, t)
        global_values[spec.name] = _finish(spec, value, where=f"{tensor_name}")
    model_values: list[dict[str, Any]] = []
    for model, params in per_model:
        values: dict[str, Any] = {}
        for spec in method.model_params:
            value = evaluate_value(params.get(spec.name), tensor_name, t)
            if value is None:
                value = evaluate_value(top_level.get(spec.name), tensor_name, t)
            values[spec.name] = _finish(spec, value, where=f"model {model}, tensor {tensor_name}")
        model_values.append(values)
    return model_values, global_values


def _finish(spec: ParamSpec, value: Any, *, where: str) -> Any:
    if value is None:
        if spec.required:
            raise RecipeError(
                f"{where}: parameter '{spec.name}' is required and not set; "
                f"set it under the model's 'parameters:' or in the top-level 'parameters:'"
            )
        return spec.default
    return coerce(spec, value, where=where)
