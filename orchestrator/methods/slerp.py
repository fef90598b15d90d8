"""slerp and nuslerp: spherical interpolation between two models.

slerp (the base and exactly one other model; ``t`` required, t = 0 gives the base):
flatten both, cos Ω = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩ (a norm ≤ 1e-8 counts as 1); if |cos Ω| > 0.9995
fall back to (1 − t)v₀ + t v₁, else θ = [sin((1 − t)Ω) v₀ + sin(tΩ) v₁] / sin Ω.

nuslerp (exactly two models besides an optional base; ``weight`` per model): t = w₂/(w₁ + w₂)
(½ when |w₁ + w₂| < 1e-6). With a base the task vectors are interpolated and the base is
added back. ``nuslerp_flatten`` (default true) treats the tensor as one vector; otherwise
each row (the last dimension) is one vector, or with ``nuslerp_row_wise`` each column
(the first dimension), as in mergekit. Norms are clamped at 1e-7; vectors count as
collinear only when 1 − cos² ≤ 1e-16, and then interpolate linearly.

Both are Σ cᵢxᵢ with coefficients from inner products: one pass for the inner products
(float64), one for the output (see ``vectors``). Under the match-mergekit precision slerp
computes its coefficients as mergekit does (``slerp_like_mergekit``), and nuslerp in half
precision follows mergekit's whole-tensor arithmetic in that dtype (``nuslerp_like_mergekit``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask, check_base_and_one_other
from orchestrator.methods.sparsify import Deltas
from orchestrator.methods.vectors import Rows, column_gram, combine, gram, row_gram

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
NUSLERP_NORM_EPS = 1e-7
NUSLERP_EPS = 1e-8


def slerp_coefficients(t: float, g: np.ndarray) -> tuple[float, float]:
    """(c₀, c₁) of slerp from the 2 × 2 Gram matrix of (v₀, v₁)."""
    n0, n1 = math.sqrt(g[0, 0]), math.sqrt(g[1, 1])
    n0, n1 = (n0 if n0 > SLERP_EPS else 1.0), (n1 if n1 > SLERP_EPS else 1.0)
    cos = min(1.0, max(-1.0, g[0, 1] / (n0 * n1)))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """slerp from v₀ (t = 0) to v₁ (t = 1) over the flattened tensors; float32/float64."""
    deltas = Deltas([v0, v1])
    c0, c1 = slerp_coefficients(float(t), gram(deltas))
    return combine(deltas, [c0, c1]).view(v0.shape)


MERGEKIT_SLERP_PIECE = 1 << 20
"""Elements per piece in mergekit's slerp: its norms and dot are sums of per-piece results."""


def slerp_like_mergekit(t: float, v0: torch.Tensor, v1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """slerp as mergekit 0.1.5 computes it for inputs cast to ``dtype``: float32 work (float64
    for float64), the norms as the norm of per-piece norms, the dot of the normalised pieces
    as a sum of per-piece sums, the coefficients as float32 tensors, and the result
    c₀v₀ + c₁v₁ (two rounded products, a rounded sum) rounded to ``dtype``. The same torch
    operations on the same pieces, so the same bits; three streaming passes."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1), v1.reshape(-1)
    n = a.numel()
    out = torch.empty(n, dtype=dtype, device=a.device)
    if n == 0:
        return out.view(v0.shape)
    t_ = torch.tensor([[t]], dtype=work)  # a float parameter tensor (float32 unless float64)
    bounds = [(start, min(start + MERGEKIT_SLERP_PIECE, n)) for start in range(0, n, MERGEKIT_SLERP_PIECE)]

    def piece(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return x[start:stop].to(dtype).to(work).view(1, -1)

    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(piece(a, *r), dim=1, keepdim=True) for r in bounds]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(piece(b, *r), dim=1, keepdim=True) for r in bounds]), dim=0)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dots = [((piece(a, *r) / norm_a) * (piece(b, *r) / norm_b)).sum(dim=1, keepdim=True) for r in bounds]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    c1 = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    for start, stop in bounds:
        out[start:stop] = (c0 * piece(a, start, stop) + c1 * piece(b, start, stop)).view(-1)
    return out.view(v0.shape)


def nuslerp_coefficients(t: float, n00: torch.Tensor, n11: torch.Tensor, n01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₀, c₁) of nuslerp per vector, from float64 tensors of ⟨v₀,v₀⟩, ⟨v₁,v₁⟩, ⟨v₀,v₁⟩."""
    n0 = n00.sqrt().clamp(min=NUSLERP_NORM_EPS)
    n1 = n11.sqrt().clamp(min=NUSLERP_NORM_EPS)
    cos = (n01 / (n0 * n1)).clamp(-1.0, 1.0)
    collinear = (1 - cos.square()) <= NUSLERP_EPS**2
    omega = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin = torch.where(collinear, torch.ones_like(cos), torch.sin(omega))
    c0 = torch.where(collinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * omega) / sin)
    c1 = torch.where(collinear, torch.full_like(cos, t), torch.sin(t * omega) / sin)
    return c0, c1


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """nuslerp of (v₀, v₁), or of their task vectors plus the base (module doc)."""
    t = float(t)
    shape = v0.shape
    if flatten or v0.dim() <= 1:
        deltas = Deltas([v0, v1], base)
        g = torch.from_numpy(gram(deltas))
        c0, c1 = nuslerp_coefficients(t, g[0, 0], g[1, 1], g[0, 1])
        return combine(deltas, [float(c0), float(c1)]).view(shape)
    if not row_wise:  # each row (last dimension) is a vector
        rows = Rows([v0, v1], base, *Rows.layout(shape))
        out = torch.empty(rows.rows, rows.cols, dtype=rows.dtype, device=rows.device)
        g = row_gram(rows)
        c0, c1 = nuslerp_coefficients(t, g[:, 0, 0], g[:, 1, 1], g[:, 0, 1])
        c0, c1 = c0.to(rows.dtype).unsqueeze(1), c1.to(rows.dtype).unsqueeze(1)
    else:  # each column (first dimension) is a vector
        rows = Rows([v0, v1], base, shape[0], v0.numel() // shape[0])
        out = torch.empty(rows.rows, rows.cols, dtype=rows.dtype, device=rows.device)
        g = column_gram(rows)
        c0, c1 = nuslerp_coefficients(t, g[:, 0, 0], g[:, 1, 1], g[:, 0, 1])
        c0, c1 = c0.to(rows.dtype).unsqueeze(0), c1.to(rows.dtype).unsqueeze(0)
    for first, end, (x0, x1), b in rows.blocks():
        a0 = c0[first:end] if not row_wise else c0
        a1 = c1[first:end] if not row_wise else c1
        block = torch.mul(x0, a0, out=out[first:end]).addcmul_(x1, a1)
        if b is not None:
            block.add_(b)
    return out.view(shape)


def nuslerp_like_mergekit(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    base: torch.Tensor | None,
    flatten: bool,
    row_wise: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """nuslerp as mergekit 0.1.5 computes it in the half dtype ``dtype``: whole-tensor
    operations in it, so each norm, unit vector, cosine, angle, sine and product is rounded
    to ``dtype`` where mergekit's is."""
    shape = v0.shape
    a, b = v0.to(dtype), v1.to(dtype)
    origin = base.to(dtype) if base is not None else None
    if origin is not None:
        a, b = a - origin, b - origin
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:  # vectors along the first dimension
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    unit_a = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    unit_b = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = torch.sum(unit_a * unit_b, dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= NUSLERP_EPS**2
    omega = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    result = torch.where(collinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    result = result.reshape(shape)
    return origin + result if origin is not None else result


# ----------------------------------------------------------------------------- registration


def _same_shapes(task: TensorTask, method: str) -> None:
    tensors = ([task.base] if task.base is not None else []) + list(task.experts)
    for tensor in tensors[1:]:
        if tensor.shape != tensors[0].shape:
            raise MergeError(
                f"{method}: tensor '{task.name}' has shapes {[tuple(x.shape) for x in tensors]} across the models; "
                "the models must share one architecture"
            )


def _merge_slerp(task: TensorTask) -> MergeResult:
    check_base_and_one_other(task, "slerp")
    if "t" not in task.global_params or task.global_params["t"] is None:
        raise RecipeError("slerp: parameter 't' is required (0 gives the base model, 1 the other)")
    t = float(task.global_params["t"])
    if task.compute_dtype is not None:
        return MergeResult(slerp_like_mergekit(t, task.base, task.experts[0], task.compute_dtype))
    return MergeResult(slerp(t, task.base, task.experts[0]))


def _merge_nuslerp(task: TensorTask) -> MergeResult:
    if len(task.experts) != 2:
        raise MergeError(f"nuslerp needs exactly two models besides the base for '{task.name}', got {len(task.experts)}")
    _same_shapes(task, "nuslerp")
    weights = []
    for params in task.model_params:
        if params.get("weight") is None:
            raise RecipeError(f"nuslerp: parameter 'weight' is required for both models (tensor '{task.name}')")
        weights.append(float(params["weight"]))
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    g = task.global_params
    flatten, row_wise = bool(g.get("nuslerp_flatten", True)), bool(g.get("nuslerp_row_wise", False))
    if task.half is not None:
        merged = nuslerp_like_mergekit(t, task.experts[0], task.experts[1], base=task.base, flatten=flatten, row_wise=row_wise, dtype=task.half)
        return MergeResult(merged)
    return MergeResult(nuslerp(t, task.experts[0], task.experts[1], base=task.base, flatten=flatten, row_wise=row_wise))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="slerp",
        merge=_merge_slerp,
        needs_base=True,
        global_params=(ParamSpec("t", float, doc="interpolation factor: 0 is the base model, 1 the other"),),
        min_experts=1,
        max_experts=1,
        doc="spherical interpolation from the base to one other model",
    ),
    MethodSpec(
        name="nuslerp",
        merge=_merge_nuslerp,
        needs_base=False,
        optional_base=True,
        model_params=(ParamSpec("weight", float, doc="this model's weight; t = w₂ / (w₁ + w₂)"),),
        global_params=(
            ParamSpec("nuslerp_flatten", bool, True, "one vector per tensor (false: per row or column)"),
            ParamSpec("nuslerp_row_wise", bool, False, "without flatten: vectors along the first dimension"),
        ),
        min_experts=2,
        max_experts=2,
        doc="slerp of two models (of their task vectors when a base is named)",
    ),
)
