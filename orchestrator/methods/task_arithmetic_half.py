"""The task-arithmetic family in half precision, rounding where mergekit 0.1.5 rounds.

mergekit casts the inputs to the recipe's ``dtype`` and runs ``GeneralizedTaskArithmeticMerge``
in it. With D that dtype and rd(·) rounding to it (each step is computed in float32 and
rounded once, as torch does for a half tensor on the CPU):

    τᵢ  = rd(θᵢ − θ₀)                         task vectors in D
    δᵢ  = τᵢ masked by the sparsifier          (its selection sorts |τᵢ| in float32: ``sorted_keep``)
    δᵢ  = rd(δᵢ · s)                           L1 rescale: s = rd(rd(Σ|τᵢ|) / rd(Σ|δᵢ|)) (float16: float32)
    xᵢ  = rd(δᵢ · rd(wᵢ))                      the weights are a D tensor
    γ   = sign(Σ xᵢ)                           the election sum is float32, in model order
    Δ   = rd(Σ mᵢxᵢ),  D = rd(Σ mᵢ rd(wᵢ))     sums over the models: float32, rounded once
    Δ   = rd(Δ / D)                            if normalize (D = 0 → 1; without consensus D = rd(Σ rd(wᵢ)), |D| < 1e-8 → 1)
    Δ   = rd(Δ · λ)                            if λ ≠ 1
    θ   = rd(θ₀ + Δ)

The pass is fused chunk by chunk like ``task_arithmetic._Combine``: the element-wise steps
run on D buffers (the same torch operation mergekit applies, so the same bits), the sums
over the models on float32 buffers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from orchestrator.methods.base import MergeResult
from orchestrator.methods.rank_sparsify import della_keeps
from orchestrator.methods.sorted_keep import SortedKeep, magnitude_keeps, outlier_keeps
from orchestrator.methods.sparsify import RESCALE_EPS, Deltas, Keep, Rescale, random_keep


def _nonzero_bits(x: torch.Tensor) -> int:
    """How many entries of float32 ``x`` are not +0 (−0 and NaN count): a count on the bit
    patterns, ten times faster than torch's count of nonzero values."""
    return int(torch.count_nonzero(x.view(torch.int32)))


def generalized_merge_half(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    dtype: torch.dtype,
    densities: Sequence[float] | None = None,
    sparsifier: str | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = None,
    seed: int = 0,
    report: Sequence[int] = (),
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
) -> MergeResult:
    """θ₀ + λΔ in mergekit's order in the half dtype ``dtype`` (module doc); a ``dtype`` tensor."""
    deltas = Deltas(experts, base, dtype=dtype)
    if not experts:
        return MergeResult(base.to(dtype, copy=True))
    count = len(experts)
    densities = list(densities) if densities is not None else [1.0] * count
    keeps: list[Keep] | None = None
    if sparsifier == "magnitude":
        keeps = magnitude_keeps(deltas, densities)
    elif sparsifier == "magnitude_outliers":
        keeps = outlier_keeps(deltas, densities, gammas if gammas is not None else [0.01] * count)
    elif sparsifier == "random":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        keeps = [random_keep(deltas.n, d, generator, deltas.device) for d in densities]
    elif sparsifier == "della":  # ranked on float32 τ: the draw is ours anyway
        keeps, _ = della_keeps(Deltas(experts, base), base.shape, densities, epsilons or [0.15] * count, seed)
    elif sparsifier is not None:
        raise ValueError(f"unknown sparsifier {sparsifier!r}")
    scales = [1.0] * count
    if keeps is not None and rescale == "l1":
        scales = half_l1_scales(deltas, keeps)
    elif keeps is not None and rescale == "inverse":
        scales = [1.0 / d if 0 < d < 1 else 1.0 for d in densities]
    combine = _HalfCombine(deltas, weights, keeps, scales, consensus, normalize, lambda_, list(report) if consensus else [])
    out = combine.run()
    figures: dict[str, Any] = {}
    if combine.report:
        figures = {
            "protected_topk": [keeps[p].kept if keeps else deltas.n for p in combine.report],
            "protected_dropped": combine.dropped,
        }
    return MergeResult(out.view(base.shape), figures)


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (to nearest, ties to even), as a Python float."""
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def half_l1_scales(deltas: Deltas, keeps: Sequence[Keep]) -> list[float]:
    """mergekit's L1 rescale factor per task vector: bfloat16 sums and quotient, rounded; float16
    on the CPU works in float32 (its ``bernoulli`` and DELLA upcast). 1 where a sum is below 1e-7."""
    before = [0.0] * len(keeps)
    after = [0.0] * len(keeps)
    values = deltas.buffer()
    for start, stop in deltas.chunks():
        for i, keep in enumerate(keeps):
            chunk = deltas.delta(i, start, stop, values).abs_()
            before[i] += float(chunk.sum(dtype=torch.float64))
            keep.apply_(chunk, start)
            after[i] += float(chunk.sum(dtype=torch.float64))
    work = deltas.dtype if deltas.dtype == torch.bfloat16 else torch.float32
    scales = []
    for total, kept in zip(before, after):
        total, kept = rounded(total, work), rounded(kept, work)
        if total < rounded(RESCALE_EPS, work) or kept < rounded(RESCALE_EPS, work):
            scales.append(1.0)
        else:
            quotient = torch.tensor(total, dtype=work) / torch.tensor(kept, dtype=work)
            scales.append(quotient.item())
    return scales


class FusedPass:
    """The fused pass over chunks both combines share: each expert's weighted δ chunk, then
    the election (or the plain sum), λ, and θ₀ + Δ into the output. Subclasses provide
    ``_weighted_delta``, ``_elect`` and ``_sum`` and set ``deltas``, ``weights``,
    ``consensus`` and ``lambda_``."""

    deltas: Deltas
    weights: list[float]
    consensus: bool
    lambda_: float

    def run(self) -> torch.Tensor:
        deltas = self.deltas
        out = torch.empty(deltas.n, dtype=deltas.dtype, device=deltas.device)
        for start, stop in deltas.chunks():
            x = [self._weighted_delta(i, start, stop) for i in range(len(self.weights))]
            size = stop - start
            mixed = self._elect(x, size) if self.consensus else self._sum(x, size)
            if self.lambda_ != 1.0:
                mixed.mul_(self.lambda_)
            torch.add(deltas.base_chunk(start, stop), mixed, out=out[start:stop])
        return out

    def _weighted_delta(self, i: int, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def _elect(self, x: list[torch.Tensor], size: int) -> torch.Tensor:
        raise NotImplementedError

    def _sum(self, x: list[torch.Tensor], size: int) -> torch.Tensor:
        raise NotImplementedError


class _HalfCombine(FusedPass):
    """The fused pass of the module doc; ``report`` counts the kept entries the election drops."""

    def __init__(
        self,
        deltas: Deltas,
        weights: Sequence[float],
        keeps: Sequence[Keep] | None,
        scales: Sequence[float],
        consensus: bool,
        normalize: bool,
        lambda_: float,
        report: list[int],
    ):
        dtype = deltas.dtype
        self.deltas, self.keeps, self.scales = deltas, keeps, scales
        self.weights = [rounded(w, dtype) for w in weights]  # mergekit's weight tensor is in D
        self.consensus, self.normalize, self.lambda_ = consensus, normalize, float(lambda_)
        self.x = [deltas.buffer() for _ in self.weights]
        self.wide = [deltas.buffer(torch.float32) for _ in self.weights]
        # where nothing rounds after the keep, it runs on the float32 copy
        self.unscaled = [scale == 1.0 and weight == 1.0 for scale, weight in zip(scales, self.weights)]
        # dropped = xᵢ's nonzero entries - those that agree with γ. A keep of magnitudes above
        # a positive bound keeps nothing that is 0: its count is known; other xᵢ are counted.
        known = [
            keeps is not None and self.unscaled[i] and isinstance(keeps[i], SortedKeep) and (keeps[i].low or 0.0) > 0
            for i in report
        ]
        self.report = report
        self.dropped = [keeps[i].kept if k else 0 for i, k in zip(report, known)]
        self.counted = {i for i, k in zip(report, known) if not k}
        self.mixed, self.tmp = deltas.buffer(), deltas.buffer(torch.float32)
        self.acc = deltas.buffer(torch.float32)
        self.gamma = deltas.buffer(torch.float32).fill_(1) if consensus else None
        self.ones = deltas.buffer(torch.float32).fill_(1) if consensus else None
        self.div = deltas.buffer(torch.float32) if consensus and normalize else None
        self.div_half = deltas.buffer() if consensus and normalize else None
        self.all_positive = all(w > 0 for w in self.weights)
        total = torch.tensor(self.weights, dtype=torch.float32).sum() if self.weights else torch.tensor(1.0)
        divisor = total.to(dtype).item()
        self.divisor = 1.0 if abs(divisor) < 1e-8 else divisor

    def _weighted_delta(self, i: int, start: int, stop: int) -> torch.Tensor:
        """xᵢ as float32 values (exactly the half ones): the steps that round run in D, the
        rest in float32, which torch computes several times faster than a half dtype."""
        x = self.deltas.delta(i, start, stop, self.x[i])  # rd(θᵢ − θ₀)
        wide = self.wide[i][: stop - start]
        if self.unscaled[i]:
            wide.copy_(x)
            if self.keeps is not None:
                self.keeps[i].apply_(wide, start)  # zeroing rounds nothing
            return wide
        if self.keeps is not None:
            self.keeps[i].apply_(x, start)
            if self.scales[i] != 1.0:
                x.mul_(self.scales[i])
        if self.weights[i] != 1.0:  # rd(x · 1) = x
            x.mul_(self.weights[i])
        return wide.copy_(x)

    def _sum(self, x: list[torch.Tensor], size: int) -> torch.Tensor:
        acc = self.acc[:size].copy_(x[0])
        for xi in x[1:]:
            acc.add_(xi)  # float32, in model order
        mixed = self.mixed[:size].copy_(acc)
        if self.normalize:
            mixed.div_(self.divisor)
        return mixed

    def _elect(self, x: list[torch.Tensor], size: int) -> torch.Tensor:
        acc = self.acc[:size].copy_(x[0])
        for xi in x[1:]:
            acc.add_(xi)
        gamma = torch.copysign(self.ones[:size], acc, out=self.gamma[:size])  # ±1 (a −0 sum: nothing agrees)
        div = self.div[:size].zero_() if self.div is not None else None
        tmp = self.tmp[:size]
        for i, xi in enumerate(x):
            signed = torch.mul(xi, gamma, out=xi)  # exact: γ = ±1
            counted = i in self.counted
            if counted:
                nonzero_before = _nonzero_bits(signed)
            agreeing = signed.relu_()  # |xᵢ| where it agrees with γ, else 0
            if counted:  # relu turns exactly the entries below 0 into +0
                self.dropped[self.report.index(i)] += nonzero_before - _nonzero_bits(agreeing)
            if i == 0:
                acc.copy_(agreeing)
            else:
                acc.add_(agreeing)  # float32: |Σ mᵢxᵢ|
            known = i in self.report and not counted
            if div is not None or known:
                agrees = torch.sign(agreeing, out=tmp)  # mᵢ: 1 where a nonzero xᵢ agrees with γ, else 0
                if div is not None:
                    div.add_(agrees, alpha=self.weights[i])  # Σ mᵢ rd(wᵢ), exact in float32
                if known:  # a NaN (the writer refuses the result) counts as nothing here
                    self.dropped[self.report.index(i)] -= int(agrees.sum().nan_to_num_(0))
        mixed = self.mixed[:size].copy_(acc.mul_(gamma))  # rd(γ|Δ|) = γ rd(|Δ|)
        if div is not None:
            divisor = self.div_half[:size].copy_(div)  # rd(Σ mᵢwᵢ)
            if self.all_positive:  # a zero divisor goes with a zero Δ: any positive stand-in gives 0
                divisor.clamp_min_(min(self.weights))
            else:
                divisor.masked_fill_(divisor == 0, 1)
            mixed.div_(divisor)  # rd(γ|Δ| / d) = γ rd(|Δ| / d)
        return mixed
