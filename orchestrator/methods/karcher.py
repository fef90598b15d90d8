"""karcher: the weighted Karcher (Riemannian) mean of the models on the unit sphere.

Every model the recipe lists is an input (a named base too, as in mergekit). With
αᵢ = wᵢ / Σ wᵢ, uᵢ = xᵢ/‖xᵢ‖ and only the inputs with ‖xᵢ‖ > ``tol`` taking part
(their α renormalised to sum to 1):

    m ← Σ αᵢuᵢ / ‖·‖  (u of the first such input if that norm is below tol)
    repeat ``max_iter`` (10) times:
        T = Σ αᵢ (θᵢ / sin θᵢ) (uᵢ − cos θᵢ · m),  cos θᵢ = ⟨m, uᵢ⟩ clamped to [−1, 1],
            leaving out the inputs with θᵢ < tol
        stop when ‖T‖ < tol (1e-5); else m ← m cos ‖T‖ + T sin ‖T‖ / ‖T‖, renormalised
    θ = (Σ αᵢ‖xᵢ‖) · m

We differ from mergekit 0.1.5 on purpose: it takes no ``weight`` and always uses
αᵢ = 1/N. Here ``weight`` (default 1 for every model) sets αᵢ, so equal weights, or none,
give mergekit's result and unequal weights give the weighted mean the method is named
for. m stays in the span of the xᵢ, so the iteration runs on their Gram matrix (float64,
N × N) after one pass over the tensors, and one more pass writes θ. In half precision
under match-mergekit, ``karcher_like_mergekit`` iterates on the tensors as mergekit does, rounding
the running mean to that dtype at every step.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask
from orchestrator.methods.sparsify import Deltas
from orchestrator.methods.vectors import combine, gram


def karcher_coefficients(g: np.ndarray, weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """The cᵢ of θ = Σ cᵢxᵢ from the Gram matrix of the xᵢ (module doc)."""
    count = len(weights)
    alphas = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return np.zeros(count)
    share = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}

    def unit(i: int) -> np.ndarray:
        e = np.zeros(count)
        e[i] = 1.0 / norms[i]
        return e

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    mean = sum(share[i] * unit(i) for i in valid)
    mean_norm = norm(mean)
    mean = unit(valid[0]) if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = np.zeros(count)
        projections = g @ mean  # ⟨m, xᵢ⟩
        for i in valid:
            cos = min(1.0, max(-1.0, projections[i] / norms[i]))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += share[i] * (theta / math.sin(theta)) * (unit(i) - cos * mean)
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    return float(alphas @ norms) * mean


def karcher(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` (module doc); float32/float64."""
    deltas = Deltas(tensors)
    if len(tensors) == 1:
        return combine(deltas, [1.0]).view(tensors[0].shape)
    coefficients = karcher_coefficients(gram(deltas), weights, max_iter=max_iter, tol=tol)
    return combine(deltas, coefficients).view(tensors[0].shape)


def karcher_like_mergekit(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int, tol: float, dtype: torch.dtype) -> torch.Tensor:
    """The Karcher mean as mergekit 0.1.5 iterates it in the half dtype ``dtype``: the points
    and the running mean are ``dtype`` tensors and every update is rounded to it; the norms
    are float32. With αᵢ = wᵢ / Σ wᵢ (mergekit: 1/N, the same for equal weights)."""
    points = [t.to(dtype) for t in tensors]
    if len(points) == 1:
        return points[0]
    total = float(sum(weights))
    alphas = [w / total for w in weights]
    norms = [torch.linalg.vector_norm(p.float()) for p in points]  # float32 0-d
    units = [torch.zeros_like(p) if float(n) == 0.0 else (p / n).to(dtype) for p, n in zip(points, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(points[0])
    share = sum(alphas[i] for i in valid)
    pairs = [(alphas[i] / share, units[i]) for i in valid]
    mean = torch.zeros_like(units[valid[0]])
    for alpha, unit in pairs:
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.float())
    mean = units[valid[0]].clone() if float(mean_norm) < tol else (mean / mean_norm).to(dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in pairs:
            cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            tangent += alpha * (angle / torch.sin(angle)) * (unit - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.float())
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(dtype)
        unit_norm = torch.linalg.vector_norm(mean.float())
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))  # float32 0-d
    return scale * mean


def _merge(task: TensorTask) -> MergeResult:
    shapes = {tuple(t.shape) for t in task.experts}
    if len(shapes) > 1:
        raise MergeError(f"karcher: tensor '{task.name}' has shapes {sorted(shapes)} across the models")
    weights = [float(p.get("weight", 1.0)) for p in task.model_params]
    if sum(weights) <= 0 or any(w < 0 for w in weights):
        raise RecipeError(f"karcher: the weights must be non-negative with a positive sum, got {weights} (tensor '{task.name}')")
    g = task.global_params
    max_iter = int(g.get("max_iter", 10))
    if max_iter < 0:
        raise RecipeError(f"karcher: parameter 'max_iter' must be ≥ 0, got {max_iter}")
    tol = float(g.get("tol", 1e-5))
    if task.half is not None:
        return MergeResult(karcher_like_mergekit(task.experts, weights, max_iter=max_iter, tol=tol, dtype=task.half))
    return MergeResult(karcher(task.experts, weights, max_iter=max_iter, tol=tol))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="karcher",
        merge=_merge,
        needs_base=False,
        model_params=(ParamSpec("weight", float, 1.0, "this model's weight (mergekit ignores it: equal weights)"),),
        global_params=(
            ParamSpec("max_iter", int, 10, "iterations of the Riemannian mean at most"),
            ParamSpec("tol", float, 1e-5, "stop when the tangent step is shorter than this"),
        ),
        doc="weighted Karcher mean on the unit sphere, rescaled by the weighted mean norm",
    ),
)
