"""Rank-based sparsifiers: breadcrumbs' outlier band and DELLA's rank-probability drop.

- ``magnitude_outliers(tau, density, gamma)`` (breadcrumbs) drops the int(γ·n) entries of
  largest |τ| and then the smallest, so that k = int(d·n) entries remain (at least one when
  d > 0); when γ·n + k > n the top cut shrinks to n − k. Ranks are by |τ|, ties broken by
  position (lowest flat index counts as larger), exactly as ``sparsify.magnitude``. The
  band is the difference of two exact top-k sets, found together by ``topk_sets``: no sort.
- ``della(tau, density, epsilon, generator=...)`` ranks |τ| within each row (the last
  dimension; a 0-/1-D tensor is one row) and keeps each entry with probability
  p = (d − ε) + 2ε·r, r = rank / (m − 1) ∈ [0, 1], m the row length (r = ½ when m = 1).
  Ranks are taken on |τ| at bfloat16 precision (the magnitude's top 8 significant bits)
  and entries with equal such magnitude share their mean rank; entries more than 2¹⁶
  times smaller than their row's largest share the row's bottom bin. This makes the rank
  one histogram per row (no sort) and independent of tie order; the expected number kept
  is exactly d·m per row, as with exact ranks. mergekit ranks the exact float values with
  an unstable argsort (ties in arbitrary order); the two differ only in how near-equal
  magnitudes (within 0.8 %) are ordered, which is below the resolution that matters here.

Both return ``Keep`` objects for the fused merge of ``task_arithmetic``; the draws of
``della`` come from a CPU generator, ``torch.rand`` over blocks of whole rows whose size
depends only on the tensor's shape, experts one after the other.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from orchestrator.errors import RecipeError
from orchestrator.methods.sparsify import Deltas, RandomKeep, TopK, keep_scales, kept_count, topk_sets, Rescale

DELLA_BLOCK = 1 << 19
"""Entries per block of rows in DELLA's pass (and at most as many histogram bins)."""

DELLA_BINS = 2048
"""Histogram bins per row: 128 per octave (bfloat16 precision) over 16 octaves."""

_DELLA_BITS = {torch.float32: (torch.int32, 0x7FFF_FFFF, 23 - 7), torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 52 - 7)}


# ----------------------------------------------------------------------------- breadcrumbs


def outlier_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(top, k): how many of the largest entries are dropped and how many are kept."""
    k = kept_count(n, density)
    if k >= n:
        return 0, n
    top = min(int(gamma * n), n - k) if gamma > 0 else 0
    return top, k


class Band:
    """The entries ranked top+1 .. top+k by |τ| (largest first): the set ``outer`` (the
    top + k largest) less the set ``inner`` (the top largest), which it contains."""

    def __init__(self, n: int, kept: int, outer: TopK, inner: TopK):
        self.n, self.kept, self.outer, self.inner = n, kept, outer, inner
        self._scratch: torch.Tensor | None = None

    def apply_(self, chunk: torch.Tensor, start: int) -> None:
        """Zero, in place, the entries of ``chunk`` (= τ[start:start+len]) outside the band."""
        if self.kept == 0:
            chunk.zero_()
            return
        if self.inner.kept == 0:
            self.outer.apply_(chunk, start)
            return
        size = chunk.numel()
        if self._scratch is None or self._scratch.numel() < size or self._scratch.dtype != chunk.dtype:
            self._scratch = torch.empty(size, dtype=chunk.dtype, device=chunk.device)
        top = self._scratch[:size]
        top.copy_(chunk)
        self.inner.apply_(top, start)  # the `top` largest alone
        self.outer.apply_(chunk, start)
        chunk.sub_(top)  # exact: x − x = 0 inside the inner set, x − 0 = x elsewhere


SMALL = 1 << 15
"""Below this many entries a stable sort is cheaper than ``topk_sets``' 65 536-bin histograms."""


def exact_topk_sets(deltas: Deltas, ranks: Sequence[Sequence[int]]) -> list[list[TopK]]:
    """``topk_sets`` (the same sets, ties by lowest index), by a stable sort for small tensors."""
    n = deltas.n
    if n > SMALL:
        return topk_sets(deltas, ranks)
    values = torch.empty(n, dtype=deltas.dtype, device=deltas.device)
    results: list[list[TopK]] = []
    for i, vector_ranks in enumerate(ranks):
        if all(k <= 0 or k >= n for k in vector_ranks):
            results.append([TopK(n, 0) if k <= 0 else TopK(n, n) for k in vector_ranks])
            continue
        for start, stop in deltas.chunks():
            deltas.delta(i, start, stop, values[start:stop]).abs_()
        ordered, order = torch.sort(values, descending=True, stable=True)  # ties: lowest index first
        sets = []
        for k in vector_ranks:
            if k <= 0 or k >= n:
                sets.append(TopK(n, 0) if k <= 0 else TopK(n, n))
                continue
            threshold = ordered[k - 1]
            equal_kept = int((ordered[:k] == threshold).sum())
            cut = n if equal_kept == int((values == threshold).sum()) else int(order[k - 1]) + 1
            below = torch.nextafter(threshold, torch.tensor(-math.inf, dtype=deltas.dtype, device=deltas.device))
            sets.append(TopK(n, k, threshold.item(), cut, below.item()))
        results.append(sets)
    return results


def outlier_keeps(deltas: Deltas, densities: Sequence[float], gammas: Sequence[float]) -> list[Band]:
    """The breadcrumbs band of each task vector; all of them from one top-k selection."""
    counts = [outlier_ranks(deltas.n, d, g) for d, g in zip(densities, gammas)]
    sets = exact_topk_sets(deltas, [[top + k, top] for top, k in counts])
    return [Band(deltas.n, k, outer, inner) for (top, k), (outer, inner) in zip(counts, sets)]


def check_gamma(gamma: float, where: str) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise RecipeError(f"{where}: parameter 'gamma' must lie in [0, 1] (the fraction of largest |τ| dropped), got {gamma}")


# ----------------------------------------------------------------------------- DELLA


def check_della_bounds(density: float, epsilon: float, where: str) -> None:
    """d ± ε must lie in (0, 1) whenever the entry is actually sparsified (0 < d < 1)."""
    if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise RecipeError(
            f"{where}: della needs density ± epsilon inside (0, 1), got density {density} and epsilon {epsilon} "
            f"(keep probabilities would run from {density - epsilon:g} to {density + epsilon:g}); "
            f"choose epsilon below {min(density, 1 - density):g}"
        )


def row_layout(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, row length) of a tensor as DELLA ranks it: the last dimension is the row."""
    n = 1
    for size in shape:
        n *= size
    m = int(shape[-1]) if len(shape) >= 2 else n
    m = max(m, 1)
    return (n // m if n else 0), m


def della_block_rows(m: int) -> int:
    """Rows per block: a fixed function of the row length, so draws depend on the shape only."""
    return max(1, DELLA_BLOCK // max(m, DELLA_BINS))


def della_keeps(
    deltas: Deltas,
    shape: Sequence[int],
    densities: Sequence[float],
    epsilons: Sequence[float],
    generator: torch.Generator,
) -> list[RandomKeep]:
    """DELLA's draw for each task vector in turn (see the module doc)."""
    return [_della_keep(deltas, i, shape, d, e, generator) for i, (d, e) in enumerate(zip(densities, epsilons))]


def _della_keep(
    deltas: Deltas, i: int, shape: Sequence[int], density: float, epsilon: float, generator: torch.Generator
) -> RandomKeep:
    n = deltas.n
    if density >= 1:
        return RandomKeep(n, n, None)
    if density <= 0 or n == 0:
        return RandomKeep(n, 0, torch.zeros(n, dtype=torch.bool, device=deltas.device))
    check_della_bounds(density, epsilon, f"expert {i}")
    rows, m = row_layout(shape)
    block_rows = della_block_rows(m)
    int_dtype, magnitude_mask, shift = _DELLA_BITS[deltas.dtype]
    device = deltas.device
    expert, base = deltas.experts[i], deltas.base
    size = min(block_rows, rows) * m
    tau = torch.empty(size, dtype=deltas.dtype, device=device)
    scratch = torch.empty(size, dtype=deltas.dtype, device=device) if base is not None else None
    key = torch.empty(size, dtype=int_dtype, device=device)
    uniform = torch.empty(size, dtype=torch.float32)
    mask = torch.empty(n, dtype=torch.bool, device=device)
    low, width = density - epsilon, 2 * epsilon
    for first in range(0, rows, block_rows):
        count = min(block_rows, rows - first)
        start, stop = first * m, (first + count) * m
        block = tau[: stop - start]
        block.copy_(expert[start:stop])
        if base is not None:
            block.sub_(scratch[: stop - start].copy_(base[start:stop]))
        bins = _row_bins(block.view(count, m), key[: stop - start].view(count, m), magnitude_mask, shift)
        probability = _bin_probabilities(bins, count, m, low, width)  # (count · DELLA_BINS,)
        p = probability.index_select(0, bins.view(-1))
        draws = torch.rand(stop - start, generator=generator, out=uniform[: stop - start])
        torch.lt(draws.to(device, non_blocking=True), p, out=mask[start:stop])
    return RandomKeep(n, int(mask.sum()), mask)


def _row_bins(block: torch.Tensor, out: torch.Tensor, magnitude_mask: int, shift: int) -> torch.Tensor:
    """Each entry's histogram bin: row · BINS + its bf16-precision |τ| relative to the row's
    largest (BINS − 1), clamped at 0. ``block`` and ``out`` are (rows, m)."""
    key = torch.bitwise_and(block.view(out.dtype), magnitude_mask, out=out).bitwise_right_shift_(shift)
    rows = key.shape[0]
    row_start = torch.arange(rows, dtype=key.dtype, device=key.device).mul_(DELLA_BINS).unsqueeze(1)  # (rows, 1)
    top = key.amax(1, keepdim=True)
    key.add_(row_start + (DELLA_BINS - 1) - top)  # the row's largest lands in its last bin
    return torch.maximum(key, row_start, out=key)


def _bin_probabilities(bins: torch.Tensor, rows: int, m: int, low: float, width: float) -> torch.Tensor:
    """Keep probability of each (row, bin): (d − ε) + 2ε · midrank / (m − 1), float32."""
    counts = torch.bincount(bins.view(-1), minlength=rows * DELLA_BINS).to(torch.float32).view(rows, DELLA_BINS)
    if m == 1:
        return torch.full((rows * DELLA_BINS,), low + width / 2, dtype=torch.float32, device=bins.device)
    below = counts.cumsum(1).sub_(counts)  # entries of the row in lower bins (exact below 2²⁴)
    midrank = below.add_(counts.sub_(1).mul_(0.5))  # mean rank (0-based) of the bin's entries
    return midrank.mul_(width / (m - 1)).add_(low).view(-1)


def check_rank_params(sparsifier: str | None, model_params: Sequence[Mapping[str, Any]], where: str, models: Sequence[str] | None = None) -> None:
    """Refuse a gamma outside [0, 1] (breadcrumbs) or a density ± epsilon outside (0, 1)
    (della), naming ``where`` (method and tensor) and the model (``models[i]``, else its
    position among the experts)."""
    for i, params in enumerate(model_params):
        model = f"model {models[i]}" if models is not None else f"expert {i}"
        if sparsifier == "magnitude_outliers":
            check_gamma(float(params.get("gamma", 0.01)), f"{where}, {model}")
        elif sparsifier == "della":
            check_della_bounds(float(params.get("density", 1.0)), float(params.get("epsilon", 0.15)), f"{where}, {model}")


# ----------------------------------------------------------------------------- one tensor


def _sparsified(tau: torch.Tensor, deltas: Deltas, keep, scale: float) -> torch.Tensor:
    out = torch.empty(deltas.n, dtype=deltas.dtype, device=deltas.device)
    for start, stop in deltas.chunks():
        chunk = deltas.delta(0, start, stop, out[start:stop])
        keep.apply_(chunk, start)
        if scale != 1.0:
            chunk.mul_(scale)
    return out.view(tau.shape)


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float = 0.01, *, rescale: Rescale = None) -> torch.Tensor:
    """τ with its int(γ·n) largest |τ| and its smallest zeroed, k = int(d·n) left (module doc)."""
    deltas = Deltas([tau])
    keep = outlier_keeps(deltas, [density], [gamma])[0]
    scale = keep_scales(deltas, [keep], [density], rescale)[0]
    return _sparsified(tau, deltas, keep, scale)


def della(
    tau: torch.Tensor, density: float, epsilon: float = 0.15, *, generator: torch.Generator, rescale: Rescale = "l1"
) -> torch.Tensor:
    """τ with each entry kept with its rank's probability, then rescaled (module doc)."""
    deltas = Deltas([tau])
    keep = della_keeps(deltas, tau.shape, [density], [epsilon], generator)[0]
    scale = keep_scales(deltas, [keep], [density], rescale)[0]
    return _sparsified(tau, deltas, keep, scale)
