"""nearswap: take the other model's value where it lies near the base's, keep the base's elsewhere.

With a = θ₀ (the base), b = θ₁ (the one other model) and the threshold ``t`` (required), per
entry:

    w = clamp(t / max(|a − b|, 10⁻⁶), 0, 1)
    θ = w·b + (1 − w)·a

An entry whose two values lie within t of each other becomes b (w = 1); farther apart, b's
share falls as t / |a − b|. As mergekit 0.1.5, including its order of operations in the
compute dtype: |a − b| rounded, the 10⁻⁶ floor in that dtype, t/x as the reciprocal times t
(how torch divides a number by a tensor), w·b and (1 − w)·a each rounded, then their sum.
Element-wise: streamed chunk by chunk.
"""

from __future__ import annotations

import torch

from orchestrator.errors import RecipeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask, check_base_and_one_other, working_dtype
from orchestrator.methods.sparsify import chunk_bounds

DISTANCE_FLOOR = 1e-6


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float, *, dtype: torch.dtype) -> torch.Tensor:
    """The nearswap of ``other`` into ``base`` (module doc), computed in ``dtype``."""
    a_flat, b_flat = base.reshape(-1), other.reshape(-1)
    out = torch.empty(a_flat.numel(), dtype=dtype, device=a_flat.device)  # (n,)
    for start, stop in chunk_bounds(out.numel()):
        a = a_flat[start:stop].to(dtype)
        b = b_flat[start:stop].to(dtype)
        weight = torch.sub(a, b).abs_().clamp_min_(DISTANCE_FLOOR).reciprocal_().mul_(t).clamp_(0, 1)  # w
        kept = torch.rsub(weight, 1).mul_(a)  # (1 − w)·a
        torch.add(weight.mul_(b), kept, out=out[start:stop])
    return out.view(base.shape)


def _merge(task: TensorTask) -> MergeResult:
    check_base_and_one_other(task, "nearswap")
    t = task.global_params.get("t")
    if t is None:
        raise RecipeError("nearswap: parameter 't' is required (entries closer than t take the other model's value)")
    dtype = task.half or working_dtype(task)
    return MergeResult(nearswap(task.base, task.experts[0], float(t), dtype=dtype))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="nearswap",
        merge=_merge,
        needs_base=True,
        streams_inputs=True,
        global_params=(ParamSpec("t", float, doc="distance below which an entry takes the other model's value"),),
        min_experts=1,
        max_experts=1,
        doc="the other model's value where it is within t of the base's, blended beyond",
    ),
)
