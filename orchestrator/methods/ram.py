"""ram and ramplus_tl: Reinforced Agent Merging (arXiv 2601.13572), tensor-local.

With τᵢ = θᵢ − θ₀ for the N experts and ε = ``epsilon`` (1e-5), an entry of τᵢ contributes
when |τᵢ| > ε. Per position, c = the number of experts that contribute there.

- ram: a position only one expert touches takes that expert's change whole; a shared one
  takes the mean of the contributing changes:
      θ = θ₀ + Σᵢ [c = 1]·[|τᵢ| > ε]·τᵢ + Σᵢ [c > 1]·[|τᵢ| > ε]·τᵢ / c
- ramplus_tl: as ram, but each expert's unique entries are scaled up by how much of its
  change it shares: with sᵢ = #{its contributing entries where c > 1} and uᵢ = #{where
  c = 1} over the whole tensor, ρᵢ = sᵢ / max(uᵢ, ε) and λᵢ = 1 + r·clamp(ρᵢ, 0, α)
  (``r`` 0.1, ``alpha`` 0.2); the unique term is multiplied by λᵢ.

As mergekit 0.1.5 in the compute dtype D: τᵢ rounded to D, ε compared in D, the shared term
τᵢ/c rounded, the sum over the experts accumulated in float32 and rounded to D, then θ₀ +
that. ramplus_tl's λᵢ are float32 (its counts and ratio are), so its unique terms, sum and
result are float32 whatever D - mergekit writes its output in float32 unless ``out_dtype``
says otherwise, and so does mergefleet under the match-mergekit precision. Element-wise
across the experts: streamed chunk by chunk (ramplus_tl counts in a first pass).
"""

from __future__ import annotations

from typing import Sequence

import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask, working_dtype
from orchestrator.methods.sparsify import Deltas


def _contributions(deltas: Deltas, start: int, stop: int, buffers: list[torch.Tensor], epsilon: float):
    """The chunk's τᵢ (in the compute dtype), their |τᵢ| > ε masks, and c (int64)."""
    taus = [deltas.delta(i, start, stop, buffers[i]) for i in range(len(buffers))]
    touched = [tau.abs() > epsilon for tau in taus]  # ε is rounded to the dtype of τ, as torch compares
    counts = torch.stack(touched).sum(0)  # (size,) int64
    return taus, touched, counts


def ram(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    dtype: torch.dtype,
    unique_factors: Sequence[float] | None = None,
) -> torch.Tensor:
    """θ₀ + the RAM merge of the experts' task vectors, in ``dtype`` (module doc).

    ``unique_factors`` (ramplus_tl's λᵢ, float32 numbers) multiply each expert's unique
    entries; the sum and the result are then float32 (float64 for float64), as in mergekit.
    """
    deltas = Deltas(experts, base, dtype=dtype)
    if not experts:
        return base.to(dtype, copy=True)
    plus = unique_factors is not None
    total_dtype = torch.promote_types(dtype, torch.float32)
    out = torch.empty(deltas.n, dtype=total_dtype if plus else dtype, device=deltas.device)  # (n,)
    buffers = [deltas.buffer() for _ in experts]
    total = deltas.buffer(total_dtype)
    factors = torch.tensor(list(unique_factors), dtype=torch.float32) if plus else None
    for start, stop in deltas.chunks():
        size = stop - start
        taus, touched, counts = _contributions(deltas, start, stop, buffers, epsilon)
        unique, shared, divisor = counts == 1, counts > 1, counts.clamp(min=1)
        acc = total[:size]
        for i, (tau, mask) in enumerate(zip(taus, touched)):
            kept = tau.mul_(mask)  # exact
            alone = kept * unique
            if factors is not None:
                alone = alone * factors[i : i + 1]  # a 1-d float32 tensor: promotes, as mergekit's (N, 1) λ
            term = alone + (kept * shared) / divisor  # one of the two is 0
            if i == 0:
                acc.copy_(term)
            else:
                acc.add_(term)  # the sum over the experts: float32 (float64), in expert order
        if plus:
            torch.add(deltas.base_chunk(start, stop), acc, out=out[start:stop])
        else:
            torch.add(deltas.base_chunk(start, stop), acc.to(dtype), out=out[start:stop])
    return out.view(base.shape)


def ramplus_factors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, epsilon: float, r: float, alpha: float, dtype: torch.dtype
) -> list[float]:
    """ramplus_tl's λᵢ = 1 + r·clamp(sᵢ / max(uᵢ, ε), 0, α), in float32 as mergekit computes them."""
    deltas = Deltas(experts, base, dtype=dtype)
    buffers = [deltas.buffer() for _ in experts]
    shared_counts = torch.zeros(len(experts), dtype=torch.int64)
    unique_counts = torch.zeros(len(experts), dtype=torch.int64)
    for start, stop in deltas.chunks():
        _, touched, counts = _contributions(deltas, start, stop, buffers, epsilon)
        for i, mask in enumerate(touched):
            shared_counts[i] += int(torch.count_nonzero(mask & (counts > 1)))
            unique_counts[i] += int(torch.count_nonzero(mask & (counts == 1)))
    rho = shared_counts / unique_counts.clamp(min=epsilon)  # float32 (the clamp to a float makes it so)
    return (1 + r * rho.clamp(min=0, max=alpha)).tolist()


def _check(task: TensorTask, method: str) -> None:
    if task.base is None:
        raise MergeError(f"{method} needs the base model's tensor for '{task.name}', and got none")
    for i, expert in enumerate(task.experts):
        if expert.shape != task.base.shape:
            raise MergeError(
                f"tensor '{task.name}': expert {i} has shape {tuple(expert.shape)}, the base {tuple(task.base.shape)}; "
                "the models must share one architecture"
            )


def _epsilon(task: TensorTask, method: str) -> float:
    epsilon = float(task.global_params.get("epsilon", 1e-5))
    if epsilon < 0:
        raise RecipeError(f"{method}: parameter 'epsilon' must be ≥ 0, got {epsilon} (tensor '{task.name}')")
    return epsilon


def _merge_ram(task: TensorTask) -> MergeResult:
    _check(task, "ram")
    dtype = task.half or working_dtype(task)
    return MergeResult(ram(task.base, task.experts, epsilon=_epsilon(task, "ram"), dtype=dtype))


def _merge_ramplus(task: TensorTask) -> MergeResult:
    _check(task, "ramplus_tl")
    epsilon = _epsilon(task, "ramplus_tl")
    g = task.global_params
    dtype = task.half or working_dtype(task)
    factors = ramplus_factors(task.base, task.experts, epsilon=epsilon, r=float(g.get("r", 0.1)), alpha=float(g.get("alpha", 0.2)), dtype=dtype)
    return MergeResult(ram(task.base, task.experts, epsilon=epsilon, dtype=dtype, unique_factors=factors))


_EPSILON = ParamSpec("epsilon", float, 1e-5, "an entry of τᵢ counts as a change when |τᵢ| > epsilon")

SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="ram",
        merge=_merge_ram,
        needs_base=True,
        streams_inputs=True,
        global_params=(_EPSILON,),
        doc="unique changes kept whole, shared changes averaged over the experts that make them",
    ),
    MethodSpec(
        name="ramplus_tl",
        merge=_merge_ramplus,
        needs_base=True,
        streams_inputs=True,
        global_params=(
            ParamSpec("r", float, 0.1, "how strongly an expert's shared fraction scales up its unique changes"),
            ParamSpec("alpha", float, 0.2, "cap of the shared-to-unique ratio"),
            _EPSILON,
        ),
        mergekit_result_float32=True,
        doc="ram with each expert's unique changes scaled by 1 + r·min(shared/unique, alpha)",
    ),
)
