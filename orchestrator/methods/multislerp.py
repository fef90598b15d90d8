"""multislerp: the weighted spherical mean of N ≥ 2 models by one tangent-space step.

With xᵢ the models' tensors (their task vectors when a base is named), wᵢ the weights
(divided by Σ wᵢ when ``normalize_weights``, the default) and ε = ``eps`` (1e-8):

    uᵢ = xᵢ / (‖xᵢ‖ + ε)              the points on the unit sphere
    m  = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖            their normalised weighted mean
    T  = Σ wᵢ (uᵢ − ⟨uᵢ, m⟩ m)        the weighted tangent vector at m
    r  = m cos ‖T‖′ + T sin ‖T‖′ / ‖T‖′,  ‖T‖′ = ‖T‖ + ε      (exponential map)
    θ  = (Σ wᵢ‖xᵢ‖) · r  (+ θ₀)

If ‖Σ wᵢuᵢ‖ < ε the mean is undefined: two models fall back to w₁x₁ + w₂x₂ (+ θ₀), more
are an error. As in mergekit. Everything above is a linear combination of the xᵢ, so it
runs on their Gram matrix: one pass for the inner products, one for the output. In half
precision under match-mergekit, ``multislerp_like_mergekit`` follows mergekit's whole-tensor
arithmetic in that dtype instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask
from orchestrator.methods.sparsify import Deltas
from orchestrator.methods.vectors import combine, gram


def multislerp_coefficients(g: np.ndarray, weights: Sequence[float], eps: float) -> np.ndarray:
    """The cᵢ of θ = Σ cᵢxᵢ (+ θ₀) from the Gram matrix of the xᵢ and the (final) weights."""
    w = np.asarray(weights, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    inverse = 1.0 / (norms + eps)
    mean = w * inverse  # Σ wᵢuᵢ in the basis xᵢ
    mean_norm = float(np.sqrt(max(mean @ g @ mean, 0.0)))
    if mean_norm < eps:
        if len(w) == 2:
            return w.copy()
        raise MergeError(
            "multislerp: the weighted sum of the models' directions is zero (antipodal models whose weights "
            "cancel); change the weights"
        )
    mean /= mean_norm
    dots = inverse * (g @ mean)  # ⟨uᵢ, m⟩
    tangent = w * inverse - float(w @ dots) * mean
    tangent_norm = float(np.sqrt(max(tangent @ g @ tangent, 0.0))) + eps
    direction = mean * np.cos(tangent_norm) + tangent * (np.sin(tangent_norm) / tangent_norm)
    return float(w @ norms) * direction


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The multislerp of ``tensors`` (of their task vectors from ``base``); module doc."""
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        if w.sum() == 0:
            raise RecipeError(f"multislerp: the weights {list(weights)} sum to 0 and cannot be normalised")
        w = w / w.sum()
    deltas = Deltas(tensors, base)
    coefficients = multislerp_coefficients(gram(deltas), w, eps)
    return combine(deltas, coefficients).view(tensors[0].shape)


def multislerp_like_mergekit(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None,
    normalize_weights: bool,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """multislerp as mergekit 0.1.5 computes it in the half dtype ``dtype``: whole-tensor
    operations in it (the weights too are a ``dtype`` tensor), each step rounded where
    mergekit's is."""
    shape = tensors[0].shape
    origin = base.to(dtype) if base is not None else None
    points = torch.stack([t.to(dtype) for t in tensors])  # (N, *shape)
    if origin is not None:
        points -= origin
    flat = points.view(len(tensors), -1)
    w = torch.tensor(list(weights), dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (N, 1)
    units = flat / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeError(
                "multislerp: the weighted sum of the models' directions is zero (antipodal models whose weights "
                "cancel); change the weights"
            )
        result = (points[0] * w[0] + points[1] * w[1]).view(shape)
        return result + origin if origin is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * column).sum(0)
    step_norm = torch.norm(step) + eps
    direction = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    result = (direction * (norms.squeeze(-1) * w).sum()).view(shape)
    return result + origin if origin is not None else result


def _merge(task: TensorTask) -> MergeResult:
    shapes = {tuple(t.shape) for t in [*task.experts, *([task.base] if task.base is not None else [])]}
    if len(shapes) > 1:
        raise MergeError(f"multislerp: tensor '{task.name}' has shapes {sorted(shapes)} across the models")
    if len(task.experts) < 2:
        raise MergeError(f"multislerp needs at least two models besides the base for '{task.name}', got {len(task.experts)}")
    weights = []
    for params in task.model_params:
        if params.get("weight") is None:
            raise RecipeError(f"multislerp: parameter 'weight' is required for every model (tensor '{task.name}')")
        weights.append(float(params["weight"]))
    g = task.global_params
    normalize_weights, eps = bool(g.get("normalize_weights", True)), float(g.get("eps", 1e-8))
    if task.half is not None:
        merged = multislerp_like_mergekit(task.experts, weights, base=task.base, normalize_weights=normalize_weights, eps=eps, dtype=task.half)
        return MergeResult(merged)
    return MergeResult(multislerp(task.experts, weights, base=task.base, normalize_weights=normalize_weights, eps=eps))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="multislerp",
        merge=_merge,
        needs_base=False,
        optional_base=True,
        model_params=(ParamSpec("weight", float, doc="this model's weight wᵢ"),),
        global_params=(
            ParamSpec("normalize_weights", bool, True, "divide the weights by their sum"),
            ParamSpec("eps", float, 1e-8, "guards the norms and the tangent step"),
        ),
        min_experts=2,
        doc="weighted spherical mean by one tangent-space step (of task vectors when a base is named)",
    ),
)
