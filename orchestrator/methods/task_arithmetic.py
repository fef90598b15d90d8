"""The task-arithmetic family (docs/methods.md): one procedure, three switches.

    δᵢ = sparsify(τᵢ, dᵢ)                       none | magnitude | random (DARE)
    Δ  = Σ wᵢδᵢ,  D = Σ wᵢ                       without consensus
    Δ  = Σ mᵢwᵢδᵢ, D = Σ mᵢwᵢ                    with consensus, mᵢ = [sign(wᵢδᵢ) = γ],
                                                 γ = sign(Σ wᵢδᵢ), a zero sum elects +
    Δ ← Δ / D if normalize;  θ = θ₀ + λΔ

``ties_sv`` adds a slack to the election: an entry of a protected model that lies in that
model's top-``slack`` fraction by |τ| and loses the election is rescued, and where any
entry is rescued the result is the weighted mean of the rescued entries alone.

The work is fused: after the sparsifiers' selection passes (see ``sparsify``), one pass
over the tensor in ``CHUNK``-sized pieces computes every expert's δ chunk, masks,
weighs, elects and writes the output chunk, all in cache-sized buffers. The election
uses only arithmetic: with g = ±1 the elected sign, mᵢwᵢδᵢ = g·relu(g·wᵢδᵢ).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods import sorted_keep
from orchestrator.methods.base import HALF_DTYPES, MergeResult, MethodSpec, ParamSpec, TensorTask
from orchestrator.methods.rank_sparsify import check_rank_params, della_keeps, outlier_keeps, rank_params_check
from orchestrator.methods.sparsify import (
    Deltas,
    Keep,
    Rescale,
    TopK,
    keep_scales,
    kept_count,
    random_keep,
    rescale_mode,
    topk_sets,
)
from orchestrator.methods.task_arithmetic_half import FusedPass, generalized_merge_half

log = logging.getLogger(__name__)

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"] | None


def generalized_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsifier: Sparsifier = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = None,
    seed: int = 0,
    protected: Sequence[int] = (),
    slack: float = 0.0,
    report: Sequence[int] = (),
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> MergeResult:
    """θ₀ + λΔ as in the module doc; float32 (float64 for float64 inputs), base's shape.

    With consensus, ``protected`` (indices into ``experts``) are the models whose entries
    a ``slack`` > 0 may rescue (ties_sv), and ``report`` the models whose drop rate goes
    into the result's report: per model, its kept entries (``protected_topk``) and how
    many of them the election discarded in the end (``protected_dropped``; an entry that
    is zero after weighting is not counted). ``seed`` feeds the CPU generator of the
    random sparsifier; the experts draw from it in order. ``gammas`` (breadcrumbs'
    outlier fraction) and ``epsilons`` (DELLA's probability spread) are per expert.

    ``compute_dtype`` follows mergekit 0.1.5 (``TensorTask.compute_dtype``): a half dtype
    runs ``generalized_merge_half``; float32/float64 computes in it and selects by
    magnitude as mergekit's sort does (``sorted_keep``) instead of lowest index first.
    """
    if compute_dtype in HALF_DTYPES:
        return generalized_merge_half(
            base, experts, weights, dtype=compute_dtype, densities=densities, sparsifier=sparsifier,
            consensus=consensus, normalize=normalize, lambda_=lambda_, rescale=rescale, seed=seed,
            report=report, gammas=gammas, epsilons=epsilons,
        )  # fmt: skip
    deltas = Deltas(experts, base, dtype=compute_dtype)
    if not experts:
        return MergeResult(base.to(deltas.dtype, copy=True))
    count = len(experts)
    densities = list(densities) if densities is not None else [1.0] * count
    report = list(report) if consensus else []
    rescue = {p: kept_count(deltas.n, slack) for p in protected} if consensus and slack > 0 else {}
    mergekit_order = compute_dtype is not None and not rescue

    keeps: list[Keep] | None = None
    rescue_sets: dict[int, TopK] = {}
    if sparsifier == "magnitude" and mergekit_order:
        keeps = sorted_keep.magnitude_keeps(deltas, densities)
    elif sparsifier == "magnitude_outliers" and mergekit_order:
        keeps = sorted_keep.outlier_keeps(deltas, densities, gammas if gammas is not None else [0.01] * count)
    elif sparsifier == "magnitude":
        kept = [kept_count(deltas.n, d) for d in densities]
        ranks = [[k] + ([min(rescue[i], k)] if rescue.get(i) else []) for i, k in enumerate(kept)]
        sets = topk_sets(deltas, ranks)
        keeps = [s[0] for s in sets]
        rescue_sets = {i: s[1] for i, s in enumerate(sets) if len(s) > 1 and s[1].kept > 0}
    elif sparsifier == "random":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        keeps = [random_keep(deltas.n, d, generator, deltas.device) for d in densities]
    elif sparsifier == "magnitude_outliers":
        keeps = outlier_keeps(deltas, densities, gammas if gammas is not None else [0.01] * count)
    elif sparsifier == "della":  # its pass also sums the L1 norms
        keeps, l1 = della_keeps(deltas, base.shape, densities, epsilons if epsilons is not None else [0.15] * count, seed)
    elif sparsifier is not None:
        raise ValueError(f"unknown sparsifier {sparsifier!r}")
    if sparsifier == "della" and rescale == "l1":
        scales = l1
    else:
        scales = keep_scales(deltas, keeps, densities, rescale) if keeps else [1.0] * count

    combine = _Combine(deltas, weights, keeps, scales, consensus, normalize, lambda_, report, rescue_sets)
    out = combine.run()
    figures: dict[str, Any] = {}
    if report:
        figures = {
            "protected_topk": [keeps[p].kept if keeps else deltas.n for p in report],
            "protected_dropped": combine.dropped,
        }
    return MergeResult(out.view(base.shape), figures)


class _Combine(FusedPass):
    """The fused pass: δ chunks → sparsify, scale, weigh → elect → output chunk."""

    def __init__(
        self,
        deltas: Deltas,
        weights: Sequence[float],
        keeps: Sequence[Keep] | None,
        scales: Sequence[float],
        consensus: bool,
        normalize: bool,
        lambda_: float,
        report: Sequence[int],
        rescue_sets: dict[int, TopK],
    ):
        self.deltas, self.weights, self.keeps, self.scales = deltas, [float(w) for w in weights], keeps, scales
        self.consensus, self.normalize, self.lambda_ = consensus, normalize, float(lambda_)
        self.report, self.rescue_sets = list(report), rescue_sets
        self.dropped = [0] * len(self.report)
        count = len(self.weights)
        self.x = [deltas.buffer() for _ in range(count)]  # wᵢδᵢ of the chunk, one per expert
        self.acc, self.gamma, self.tmp = deltas.buffer(), deltas.buffer(), deltas.buffer()
        self.ones = deltas.buffer().fill_(1) if consensus else None
        as_stored = torch.tensor(self.weights, dtype=deltas.dtype)  # the weights as the tensors see them
        self.smallest_weight = float(as_stored.min()) if count else 0.0
        self.div = deltas.buffer() if consensus and normalize else None
        self.z = {p: deltas.buffer() for p in rescue_sets}  # wₚδₚ on p's slack set
        if rescue_sets:
            self.rescued, self.rescued_count = deltas.buffer(), deltas.buffer()
            self.rescued_weight = deltas.buffer() if normalize else None
        # Without consensus the divisor is one number; mergekit replaces |D| < 1e-8 by 1.
        divisor = float(torch.tensor(self.weights, dtype=deltas.dtype).sum()) if count else 1.0
        self.divisor = 1.0 if abs(divisor) < 1e-8 else divisor

    def _weighted_delta(self, i: int, start: int, stop: int) -> torch.Tensor:
        x = self.deltas.delta(i, start, stop, self.x[i])  # (size,)
        if self.keeps is not None:
            self.keeps[i].apply_(x, start)
        z = None
        if i in self.rescue_sets:
            z = self.z[i][: stop - start]
            z.copy_(x)
            self.rescue_sets[i].apply_(z, start)  # the slack set lies inside the kept set
        for t in (x, z) if z is not None else (x,):
            if self.scales[i] != 1.0:
                t.mul_(self.scales[i])
            t.mul_(self.weights[i])
        return x

    def _sum(self, x: list[torch.Tensor], size: int) -> torch.Tensor:
        total = x[0]
        if len(x) > 1:
            total = torch.add(x[0], x[1], out=self.acc[:size])
            for xi in x[2:]:
                total.add_(xi)
        if self.normalize:
            total.div_(self.divisor)
        return total

    def _elect(self, x: list[torch.Tensor], size: int) -> torch.Tensor:
        acc, gamma, tmp = self.acc[:size], self.gamma[:size], self.tmp[:size]
        if len(x) > 1:
            torch.add(x[0], x[1], out=acc)
        else:
            acc.copy_(x[0])
        for xi in x[2:]:
            acc.add_(xi)  # Σ wᵢδᵢ, in expert order
        # γ = +1 where the sum is ≥ 0, else −1. The sum is −0 only where every term is ±0,
        # and there no entry agrees with either sign, so copysign's −1 changes nothing.
        torch.copysign(self.ones[:size], acc, out=gamma)
        div = self.div[:size].zero_() if self.div is not None else None
        if self.rescue_sets:
            self._rescue(gamma, size)
        for i, xi in enumerate(x):
            signed = torch.mul(xi, gamma, out=xi)  # > 0 where wᵢδᵢ agrees with γ, < 0 where it loses
            if i in self.report:
                lost = torch.clamp_max(signed, 0, out=tmp).sign_()
                self.dropped[self.report.index(i)] -= int(float(lost.sum()))
            agreeing = signed.relu_()  # |mᵢwᵢδᵢ|
            if i == 0:
                acc.copy_(agreeing)
            else:
                acc.add_(agreeing)
            if div is not None:
                div.add_(torch.sign(agreeing, out=tmp), alpha=self.weights[i])  # Σ mᵢwᵢ
        if div is not None:
            acc.div_(self._nonzero_or_one(div, tmp))
        acc.mul_(gamma)
        if self.rescue_sets:
            any_rescued = self.rescued_count[:size].sign_()
            acc.mul_(torch.neg(any_rescued, out=tmp).add_(1)).add_(self.rescued[:size])
        return acc

    def _nonzero_or_one(self, divisor: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        """The divisor with its zeros replaced by 1, in place, exactly.

        With positive weights a sum of agreeing weights is 0 or at least the smallest
        weight, and where it is 0 nothing agrees (the dividend is 0): one clamp does.
        Otherwise D + (1 − sign|D|).
        """
        if self.smallest_weight > 0:
            return divisor.clamp_min_(self.smallest_weight)
        one_if_zero = torch.abs(divisor, out=tmp).sign_().neg_().add_(1)
        return divisor.add_(one_if_zero)

    def _rescue(self, gamma: torch.Tensor, size: int) -> None:
        """ties_sv: collect the protected entries in their slack sets that lose the election.

        Leaves in ``rescued`` the value those positions take (−γ·Σ|rescued| / Σ w, or the
        plain sum without normalize; 0 elsewhere) and in ``rescued_count`` how many there are.
        """
        rescued, count, tmp = self.rescued[:size].zero_(), self.rescued_count[:size].zero_(), self.tmp[:size]
        weight = self.rescued_weight[:size].zero_() if self.rescued_weight is not None else None
        for p, z in self.z.items():
            lost = torch.mul(z[:size], gamma, out=z[:size]).neg_().relu_()  # |wₚδₚ| where it disagrees
            rescued.add_(lost)
            flags = torch.sign(lost, out=tmp)
            count.add_(flags)
            if weight is not None:
                weight.add_(flags, alpha=self.weights[p])
            if p in self.report:
                self.dropped[self.report.index(p)] -= int(float(flags.sum()))
        if weight is not None:
            rescued.div_(self._nonzero_or_one(weight, tmp))
        rescued.mul_(gamma).neg_()  # every rescued entry has the sign −γ


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class _Variant:
    name: str
    sparsifier: Sparsifier
    consensus: bool
    normalize: bool
    rescale: bool
    slack: bool = False
    doc: str = ""


_VARIANTS = (
    _Variant("task_arithmetic", None, False, False, False, doc="θ₀ + λ Σ wᵢτᵢ"),
    _Variant("ties", "magnitude", True, True, False, doc="magnitude top-k, sign election, normalised"),
    _Variant("dare_ties", "random", True, False, True, doc="DARE random drop with L1 rescale, sign election"),
    _Variant("dare_linear", "random", False, False, True, doc="DARE random drop with L1 rescale, weighted sum"),
    _Variant("ties_sv", "magnitude", True, True, False, slack=True, doc="ties with a slack for protected models"),
    _Variant("breadcrumbs", "magnitude_outliers", False, False, False, doc="drop the largest γ and the smallest |τ|, weighted sum"),
    _Variant("breadcrumbs_ties", "magnitude_outliers", True, False, False, doc="breadcrumbs' band, sign election"),
    _Variant("della", "della", True, True, True, doc="rank-probability drop with L1 rescale, sign election"),
    _Variant("della_linear", "della", False, False, True, doc="rank-probability drop with L1 rescale, weighted sum"),
)


def _merge_for(variant: _Variant):
    def merge(task: TensorTask) -> MergeResult:
        if task.base is None:
            raise MergeError(f"{variant.name} needs the base model's tensor for '{task.name}', and got none")
        for i, expert in enumerate(task.experts):
            if expert.shape != task.base.shape:
                raise MergeError(
                    f"tensor '{task.name}': expert {i} has shape {tuple(expert.shape)}, the base "
                    f"{tuple(task.base.shape)}; the models must share one architecture"
                )
        g = task.global_params
        params = task.model_params
        weights = [_get(p, "weight", task.name, variant.name) for p in params]
        marked: list[int] = []
        report: list[int] = []
        if variant.consensus and variant.sparsifier == "magnitude":
            marked = [i for i, p in enumerate(params) if p.get("protect", False)]
            report = marked or list(range(len(params)))
            if variant.slack and not marked and task.experts:
                _warn_once(f"{variant.name}: no model sets 'protect: true', so nothing is rescued and it runs as ties")
        slack = float(g.get("slack", 0.1)) if variant.slack else 0.0
        if not 0.0 <= slack <= 1.0:
            raise RecipeError(f"{variant.name}: parameter 'slack' must lie in [0, 1], got {slack} (tensor '{task.name}')")
        rescale = g.get("rescale", variant.rescale)
        if rescale not in (True, False, "inverse"):
            raise RecipeError(f"{variant.name}: parameter 'rescale' must be true, false or \"inverse\", got {rescale!r}")
        check_rank_params(variant.sparsifier, params, f"{variant.name}, tensor '{task.name}'")
        return generalized_merge(
            task.base,
            task.experts,
            weights,
            densities=[float(p.get("density", 1.0)) for p in params] if variant.sparsifier else None,
            sparsifier=variant.sparsifier,
            consensus=variant.consensus,
            normalize=bool(g.get("normalize", variant.normalize)),
            lambda_=float(g.get("lambda", 1.0)),
            rescale=rescale_mode(rescale),
            seed=task.seed,
            protected=marked,
            slack=slack,
            report=report,
            gammas=[float(p.get("gamma", 0.01)) for p in params] if variant.sparsifier == "magnitude_outliers" else None,
            epsilons=[float(p.get("epsilon", 0.15)) for p in params] if variant.sparsifier == "della" else None,
            compute_dtype=None if variant.slack else task.compute_dtype,  # ties_sv: not in mergekit, float32
        )

    merge.__name__ = f"merge_{variant.name}"
    return merge


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def _get(params: Any, name: str, tensor: str, method: str) -> float:
    if name not in params:
        raise RecipeError(f"{method}: parameter '{name}' is required for every model (tensor '{tensor}')")
    return float(params[name])


def _spec(variant: _Variant) -> MethodSpec:
    model_params = [ParamSpec("weight", float, doc="this model's weight wᵢ")]
    global_params = [
        ParamSpec("lambda", float, 1.0, "scale of the merged task vector"),
        ParamSpec("normalize", bool, variant.normalize, "divide by the (agreeing) weights' sum"),
        ParamSpec("int8_mask", bool, False, "accepted for mergekit recipes; no numerical effect"),
    ]
    if variant.sparsifier:
        model_params.append(ParamSpec("density", float, 1.0, "fraction of τᵢ's entries kept"))
        global_params.append(
            ParamSpec("rescale", bool, variant.rescale, 'true: L1-match what is kept; "inverse": divide by density')
        )
    if variant.consensus and variant.sparsifier == "magnitude":
        model_params.append(ParamSpec("protect", bool, False, "report this model's drop rate (ties_sv: and rescue its top-slack entries); if no model sets it, all are reported"))
    if variant.sparsifier == "magnitude_outliers":
        model_params.append(ParamSpec("gamma", float, 0.01, "fraction of τᵢ's largest |τ| dropped as outliers"))
    if variant.sparsifier == "della":
        model_params.append(ParamSpec("epsilon", float, 0.15, "keep probabilities run from density − ε to density + ε"))
    if variant.slack:
        global_params.append(ParamSpec("slack", float, 0.1, "fraction of a protected model's top |τ| kept past the election"))
    return MethodSpec(
        name=variant.name,
        merge=_merge_for(variant),
        needs_base=True,
        streams_inputs=True,
        model_params=tuple(model_params),
        global_params=tuple(global_params),
        uses_randomness=variant.sparsifier in ("random", "della"),
        sparsifies=variant.sparsifier is not None,
        check_params=rank_params_check(variant.name, variant.sparsifier),
        doc=variant.doc,
    )


SPECS: tuple[MethodSpec, ...] = tuple(_spec(v) for v in _VARIANTS)
