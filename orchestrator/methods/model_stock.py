"""model_stock: interpolate between the base and the experts' average by their agreement.

With τᵢ = θᵢ − θ₀ (N ≥ 2 experts), cos θ is the mean over pairs i < j of
⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6) (each clamped to [−1, 1]), over the whole tensor or, with
``filter_wise``, per row (the last dimension; a 1-D tensor is one row). Then

    t = N cos θ / (1 + (N − 1) cos θ)     (t = 0 where |1 + (N − 1) cos θ| < 1e-6)
    θ = t · mean(θᵢ) + (1 − t) · θ₀ = θ₀ + (t / N) Σ τᵢ

as in mergekit 0.1.5 (its guard at the singular point keeps the base). One pass collects
the inner products of the τᵢ (float64), one writes the output. In half precision under
match-mergekit, ``model_stock_like_mergekit`` follows mergekit's own arithmetic in that dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from orchestrator.errors import MergeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask
from orchestrator.methods.sparsify import Deltas
from orchestrator.methods.vectors import Rows, combine, gram, row_gram


def stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """t from Gram matrices g (..., N, N) of the task vectors; float64 (...)."""
    count = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (..., N)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            cosines.append((g[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """θ₀ + (t/N) Σ τᵢ with t from the experts' agreement (module doc)."""
    count = len(experts)
    if not filter_wise or base.dim() <= 1:
        deltas = Deltas(experts, base)
        t = float(stock_ratio(torch.from_numpy(gram(deltas))))
        return combine(deltas, [t / count] * count).view(base.shape)
    rows = Rows(experts, base, *Rows.layout(base.shape))
    scale = (stock_ratio(row_gram(rows)) / count).to(rows.dtype).unsqueeze(1)  # (rows, 1)
    out = torch.empty(rows.rows, rows.cols, dtype=rows.dtype, device=rows.device)
    for first, end, xs, b in rows.blocks():
        block = out[first:end]
        torch.add(xs[0], xs[1], out=block)
        for x in xs[2:]:
            block.add_(x)
        block.mul_(scale[first:end]).add_(b)
    return out.view(base.shape)


def model_stock_like_mergekit(base: torch.Tensor, experts: Sequence[torch.Tensor], *, filter_wise: bool, dtype: torch.dtype) -> torch.Tensor:
    """The same merge as mergekit 0.1.5 computes it in the half dtype ``dtype``: whole-tensor
    operations in it - the norms, dots, cosines, their mean and t rounded to it, the experts'
    mean as their running sum divided by N - then t·mean + (1 − t)·θ₀."""
    theta0 = base.to(dtype)
    models = [expert.to(dtype) for expert in experts]
    count = len(models)
    if filter_wise:  # one ratio per row (a 1-D tensor is one row)
        rows = [m.unsqueeze(0) if m.dim() == 1 else m for m in (theta0, *models)]
    else:
        rows = [m.reshape(-1) for m in (theta0, *models)]
    origin, points = rows[0], rows[1:]
    offsets = [point - origin for point in points]
    norms = [torch.norm(offset, dim=-1) for offset in offsets]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    total = points[0]
    for point in points[1:]:
        total = total + point  # a running sum in dtype, as Python's sum() over the tensors
    mean = total / count
    return (ratio * mean + (1 - ratio) * origin).reshape(base.shape)


def _merge(task: TensorTask) -> MergeResult:
    if task.base is None:
        raise MergeError(f"model_stock needs the base model's tensor for '{task.name}', and got none")
    if len(task.experts) < 2:
        raise MergeError(f"model_stock needs at least two models besides the base for '{task.name}', got {len(task.experts)}")
    for i, expert in enumerate(task.experts):
        if expert.shape != task.base.shape:
            raise MergeError(
                f"tensor '{task.name}': expert {i} has shape {tuple(expert.shape)}, the base {tuple(task.base.shape)}"
            )
    filter_wise = bool(task.global_params.get("filter_wise", False))
    if task.half is not None:
        return MergeResult(model_stock_like_mergekit(task.base, task.experts, filter_wise=filter_wise, dtype=task.half))
    return MergeResult(model_stock(task.base, task.experts, filter_wise=filter_wise))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="model_stock",
        merge=_merge,
        needs_base=True,
        global_params=(ParamSpec("filter_wise", bool, False, "one ratio per row instead of per tensor"),),
        min_experts=2,
        doc="base-to-average interpolation by the experts' mean pairwise cosine",
    ),
)
