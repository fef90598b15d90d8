"""sce: select by variance, calculate weights, erase minority signs (arXiv 2408.07990).

With τᵢ = θᵢ − θ₀ for the N experts:

1. Select (when ``select_topk`` = s < 1): vᵖ = the population variance of τᵢᵖ across the
   experts at each position p; keep the k = int(s · #{p : vᵖ ≠ 0}) positions of largest
   variance (ties by position, lowest flat index first) and zero τ elsewhere. s ≤ 0 keeps
   nothing.
2. Calculate: ωᵢ = mean over positions of τᵢ² (after the selection), divided by Σ ωᵢ
   (1/N each when that sum is below 1e-6).
3. Erase: elect γ = sign(Σ τᵢ) per position (a zero sum elects +); mᵢ = [sign τᵢ = γ].
4. θ = θ₀ + Σ mᵢωᵢτᵢ / max(Σ mᵢωᵢ, 1e-6).

As mergekit 0.1.5 (which breaks ties in the selection arbitrarily). The selection is the
exact histogram top-k of ``sparsify`` over the variance; then one pass sums the ωᵢ and
one writes the output, each chunk by chunk. Under the match-mergekit precision,
``sce_like_mergekit`` follows mergekit's own whole-tensor arithmetic and tie order instead
(in float32 too: inputs stored in half precision give many equal variances).
"""

from __future__ import annotations

from typing import Sequence

import torch

from orchestrator.errors import MergeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask
from orchestrator.methods.rank_sparsify import exact_topk_sets
from orchestrator.methods.sorted_keep import largest_keep
from orchestrator.methods.sparsify import Deltas, TopK, stable_sum

WEIGHT_FLOOR = 1e-6


def _variance_top(deltas: Deltas, select_topk: float) -> tuple[TopK, torch.Tensor]:
    """The set of the k largest variances across the experts (step 1), and the variances."""
    count = len(deltas.experts)
    variance = torch.empty(deltas.n, dtype=deltas.dtype, device=deltas.device)  # (n,)
    buffers = [deltas.buffer() for _ in range(count)]
    mean, tmp = deltas.buffer(), deltas.buffer()
    for start, stop in deltas.chunks():
        size = stop - start
        xs = [deltas.delta(i, start, stop, buffers[i]) for i in range(count)]
        for x in xs[1:]:
            x.sub_(xs[0])  # shifted by the first expert: equal values give exactly 0
        shift = mean[:size].zero_()
        for x in xs[1:]:
            shift.add_(x)
        shift.div_(count)
        out = variance[start:stop]
        torch.mul(shift, shift, out=out)  # the first expert's deviation, (0 − mean)²
        for x in xs[1:]:
            d = torch.sub(x, shift, out=tmp[:size])
            out.addcmul_(d, d)
        out.div_(count)
    k = int(int(torch.count_nonzero(variance)) * select_topk)
    return exact_topk_sets(Deltas([variance]), [[k]])[0][0] if k > 0 else TopK(deltas.n, 0), variance


class _Selection:
    """Applies step 1 to one chunk of a task vector: zero it outside the selected positions."""

    def __init__(self, deltas: Deltas, select_topk: float):
        self.top: TopK | None = None
        self.variance: torch.Tensor | None = None
        self.none = select_topk <= 0
        if 0 < select_topk < 1:
            self.top, self.variance = _variance_top(deltas, select_topk)
        self._chunk = deltas.buffer()

    def mask(self, start: int, stop: int) -> torch.Tensor | None:
        """1 at selected positions of the chunk, 0 elsewhere (None: everything selected)."""
        if self.top is None:
            return None
        chosen = self._chunk[: stop - start].copy_(self.variance[start:stop])
        self.top.apply_(chosen, start)  # variances outside the top-k zeroed; those kept are > 0
        return chosen.sign_()


def sce(base: torch.Tensor, experts: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """θ₀ + the SCE merge of the experts' task vectors (module doc)."""
    deltas = Deltas(experts, base)
    count = len(experts)
    if count == 0 or select_topk <= 0:
        return base.to(deltas.dtype, copy=True)
    selection = _Selection(deltas, select_topk)
    buffers = [deltas.buffer() for _ in range(count)]

    def chunk_deltas(start: int, stop: int) -> list[torch.Tensor]:
        xs = [deltas.delta(i, start, stop, buffers[i]) for i in range(count)]
        mask = selection.mask(start, stop)
        if mask is not None:
            for x in xs:
                x.mul_(mask)
        return xs

    squares = [0.0] * count
    product = deltas.buffer()
    for start, stop in deltas.chunks():
        for i, x in enumerate(chunk_deltas(start, stop)):
            squares[i] += stable_sum(torch.mul(x, x, out=product[: stop - start]))
    omega = [s / deltas.n for s in squares]
    total = sum(omega)
    omega = [1.0 / count] * count if abs(total) < WEIGHT_FLOOR else [w / total for w in omega]

    out = torch.empty(deltas.n, dtype=deltas.dtype, device=deltas.device)  # (n,)
    gamma, numerator, denominator, tmp = deltas.buffer(), deltas.buffer(), deltas.buffer(), deltas.buffer()
    for start, stop in deltas.chunks():
        size = stop - start
        xs = chunk_deltas(start, stop)
        g, num, den, t = gamma[:size], numerator[:size], denominator[:size], tmp[:size]
        torch.add(xs[0], xs[1], out=g) if count > 1 else g.copy_(xs[0])
        for x in xs[2:]:
            g.add_(x)
        g.sign_().add_(0.5).sign_()  # γ = +1 where Σ τᵢ ≥ 0, else −1
        num.zero_()
        den.zero_()
        for x, w in zip(xs, omega):
            agreeing = x.mul_(g).relu_()  # |τᵢ| where sign τᵢ = γ, else 0
            num.add_(agreeing, alpha=w)
            den.add_(torch.sign(agreeing, out=t), alpha=w)
        num.div_(den.clamp_(min=WEIGHT_FLOOR)).mul_(g)
        torch.add(deltas.base_chunk(start, stop), num, out=out[start:stop])
    return out.view(base.shape)


def sce_like_mergekit(base: torch.Tensor, experts: Sequence[torch.Tensor], *, select_topk: float, dtype: torch.dtype) -> torch.Tensor:
    """The same merge as mergekit 0.1.5 computes it in ``dtype``: whole-tensor
    operations in it (the variance, the per-model mean of τ², the sums over the models each
    rounded to it), and the top-k positions of the variance as its ``torch.topk`` picks them
    among equal values (``sorted_keep.largest_keep``)."""
    theta0 = base.to(dtype)
    count = len(experts)
    if count == 0 or select_topk <= 0:
        return theta0.clone()
    taus = torch.stack([expert.to(dtype) - theta0 for expert in experts])  # (N, *shape)
    flat = taus.view(count, -1)
    if select_topk < 1:
        variance = torch.var(taus, dim=0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(variance)) * select_topk)
        if k == 0:
            flat.zero_()
        else:
            chosen = variance.abs()
            largest_keep(chosen, k).apply_(chosen, 0)  # the top-k variances; all of them > 0
            taus.mul_(chosen.sign_().view(taus.shape[1:]))
    elected = (taus.sum(dim=0) >= 0).to(dtype) * 2 - 1  # γ, rounded sums as mergekit's
    agrees = torch.sign(taus) == elected  # (N, *shape)
    omega = flat.square().mean(dim=1)  # (N,) in dtype
    omega_total = omega.sum().item()
    omega = torch.ones_like(omega) / count if abs(omega_total) < WEIGHT_FLOOR else omega / omega_total
    shares = omega.view(count, *([1] * (taus.dim() - 1))) * agrees  # (N, *shape): ωᵢ where τᵢ agrees
    numerator = (taus * shares).sum(dim=0)
    return theta0 + numerator / shares.sum(dim=0).clamp(min=WEIGHT_FLOOR)


def _merge(task: TensorTask) -> MergeResult:
    if task.base is None:
        raise MergeError(f"sce needs the base model's tensor for '{task.name}', and got none")
    for i, expert in enumerate(task.experts):
        if expert.shape != task.base.shape:
            raise MergeError(
                f"tensor '{task.name}': expert {i} has shape {tuple(expert.shape)}, the base {tuple(task.base.shape)}"
            )
    select_topk = float(task.global_params.get("select_topk", 1.0))
    if task.compute_dtype is not None:  # also float32: mergekit's topk order among equal variances
        return MergeResult(sce_like_mergekit(task.base, task.experts, select_topk=select_topk, dtype=task.compute_dtype))
    return MergeResult(sce(task.base, task.experts, select_topk=select_topk))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="sce",
        merge=_merge,
        needs_base=True,
        global_params=(
            ParamSpec("select_topk", float, 1.0, "fraction of positions kept, by variance across the experts"),
            ParamSpec("int8_mask", bool, False, "accepted for mergekit recipes; no numerical effect"),
        ),
        doc="select by variance, weight by mean τ², erase minority signs",
    ),
)
