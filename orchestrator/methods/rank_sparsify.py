"""Rank-based sparsifiers: breadcrumbs' outlier band and DELLA's rank-probability drop.

- ``magnitude_outliers(tau, density, gamma)`` (breadcrumbs) drops the int(γ·n) entries of
  largest |τ| and then the smallest, so that k = int(d·n) entries remain (at least one when
  d > 0); when γ·n + k > n the top cut shrinks to n − k. Ranks are by |τ|, ties broken by
  position (lowest flat index counts as larger), exactly as ``sparsify.magnitude``. The
  band is the difference of two exact top-k sets, found together by ``topk_sets`` (no
  sort; below ``SMALL`` entries a stable sort is cheaper). mergekit sorts, ties in
  arbitrary order, and keeps int(d·n) even when that is 0.
- ``della(tau, density, epsilon, seed=...)`` ranks |τ| within each row (the last
  dimension; a 0-/1-D tensor is one row) and keeps each entry with probability
  p = (d − ε) + 2ε·r, r = rank / (m − 1) ∈ [0, 1], m the row length (p = d when m = 1).
  Ranks are taken on |τ| at bfloat16 precision (its top 8 significant bits, truncated)
  and entries with equal such magnitude share their mean rank; entries more than 2¹⁶
  times smaller than their row's largest share the row's bottom bin. This makes the rank
  one histogram per row (no sort) and independent of tie order; the expected number kept
  is exactly d·m per row, as with exact ranks. mergekit ranks the exact float values with
  an unstable argsort (ties in arbitrary order); the two differ only in how magnitudes
  within 0.8 % of each other are ordered.

  The draw, exactly: in blocks of whole rows (``della_block_rows``, a function of the
  shape only), v ~ U[low, high) from ``Tensor.uniform_`` (float32) on the expert's own CPU
  generator (``della_seed``), with (low, high) = ½ + ((ε − d), (1 − d + ε))·(m − 1)/2ε; the
  entry is kept iff v < r·(m − 1) + ½, i.e. with probability p. Drawing in rank space
  saves a pass over the tensor; one generator per expert lets the pass go block by block.

Both return ``Keep`` objects for the fused merge of ``task_arithmetic``; DELLA's keeps its
mask as bits (n/8 bytes per expert) and its pass sums the L1 norms for the rescale too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from orchestrator.errors import RecipeError
from orchestrator.methods.base import tensor_seed
from orchestrator.methods.sparsify import RESCALE_EPS, Deltas, Rescale, TopK, keep_scales, kept_count, stable_sum, topk_sets

DELLA_BLOCK = 1 << 17
"""Entries per block of rows in DELLA's pass (and at most as many histogram bins)."""

DELLA_BINS = 2048
"""Histogram bins per row: 128 per octave (bfloat16 precision) over 16 octaves."""

SHORT_ROW = 256
"""Rows shorter than this are ranked by a sort (same ranks): their table would be mostly empty."""

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


def della_block_rows(m: int, rows: int) -> int:
    """Rows per block: a fixed function of the shape, so draws depend on the shape only;
    a multiple of 8 unless one block holds every row, so blocks start on whole mask bytes."""
    block = max(1, DELLA_BLOCK // (m if m < SHORT_ROW else max(m, DELLA_BINS)))
    return rows if block >= rows else max(8, block // 8 * 8)


def della_seed(seed: int, expert: int) -> int:
    """The seed of expert ``expert``'s generator: each expert draws from its own stream."""
    return tensor_seed(seed, f"della expert {expert}")


def della_draw_range(m: int, density: float, epsilon: float) -> tuple[float, float]:
    """(low, high) of v in rank space: keep iff v < midrank + ½ with v ~ U[low, high)."""
    if m == 1:
        return 0.5 - density, 1.5 - density  # the single entry is kept with probability d
    span = (m - 1) / (2 * epsilon)
    return 0.5 - (density - epsilon) * span, 0.5 + (1 - density + epsilon) * span


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _bit_shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_bits(mask: torch.Tensor, out: torch.Tensor) -> None:
    """The 0/1 bytes ``mask`` (uint8) as bits into ``out`` (uint8, ⌈len/8⌉), entry j of
    byte b at bit j (little-endian, as numpy's ``packbits(bitorder="little")``)."""
    whole = mask.numel() // 8
    shifts = _bit_shifts(mask.device)
    if whole:
        torch.sum(mask[: whole * 8].view(whole, 8) << shifts, 1, dtype=torch.uint8, out=out[:whole])
    if whole * 8 < mask.numel():
        tail = mask[whole * 8 :]
        out[whole] = int(torch.sum(tail << shifts[: tail.numel()], dtype=torch.int64))


class RankKeep:
    """DELLA's draw for one task vector: the kept entries as bits (``pack_bits``), n/8
    bytes, unpacked a chunk at a time into a uint8 0/1 factor (uint8 multiplies fast).
    ``bits`` None keeps everything (``kept`` = n) or nothing (``kept`` = 0)."""

    def __init__(self, n: int, kept: int, bits: torch.Tensor | None):
        self.n, self.kept, self.bits = n, kept, bits
        self._scratch: torch.Tensor | None = None

    def apply_(self, chunk: torch.Tensor, start: int) -> None:
        if self.kept == 0:
            chunk.zero_()
            return
        if self.bits is None:
            return
        size = chunk.numel()
        first, last = start // 8, (start + size + 7) // 8
        need = (last - first) * 8
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8, device=self.bits.device)
        unpacked = self._scratch[:need].view(last - first, 8)
        torch.bitwise_right_shift(self.bits[first:last].unsqueeze(1), _bit_shifts(self.bits.device), out=unpacked)
        unpacked.bitwise_and_(1)
        offset = start - first * 8
        chunk.mul_(unpacked.view(-1)[offset : offset + size])


def della_keeps(
    deltas: Deltas,
    shape: Sequence[int],
    densities: Sequence[float],
    epsilons: Sequence[float],
    seed: int,
) -> tuple[list[RankKeep], list[float]]:
    """DELLA's draw for each task vector, and each one's L1 rescale factor ‖τ‖₁ / ‖kept‖₁
    (1 where either is below ``RESCALE_EPS`` or nothing or everything is kept).

    One pass in blocks of whole rows; per block the base is upcast once, then for each
    expert: τ, the bins of |τ|, one ``bincount``, the mid-ranks per bin, the draws from the
    expert's own generator (``della_seed``), the comparison, and the two L1 sums.
    """
    n = deltas.n
    device = deltas.device
    keeps: list[RankKeep | None] = [None] * len(densities)
    active = []
    for i, (density, epsilon) in enumerate(zip(densities, epsilons)):
        if density >= 1:
            keeps[i] = RankKeep(n, n, None)
        elif density <= 0 or n == 0:
            keeps[i] = RankKeep(n, 0, None)
        else:
            check_della_bounds(density, epsilon, f"expert {i}")
            active.append(i)
    scales = [1.0] * len(densities)
    if not active:
        return keeps, scales  # type: ignore[return-value]

    rows, m = row_layout(shape)
    block_rows = della_block_rows(m, rows)
    int_dtype, magnitude_mask, shift = _DELLA_BITS[deltas.dtype]
    size = min(block_rows, rows) * m
    base_block = torch.empty(size, dtype=deltas.dtype, device=device) if deltas.base is not None else None
    tau = torch.empty(size, dtype=deltas.dtype, device=device)
    key = torch.empty(size, dtype=int_dtype, device=device)
    draws = torch.empty(size, dtype=torch.float32)
    chosen = torch.empty(size, dtype=torch.bool, device=device)
    generators = {i: torch.Generator(device="cpu").manual_seed(della_seed(seed, i)) for i in active}
    ranges = {i: della_draw_range(m, densities[i], epsilons[i]) for i in active}
    bits = {i: torch.empty((n + 7) // 8, dtype=torch.uint8, device=device) for i in active}
    kept = {i: 0 for i in active}
    before = {i: 0.0 for i in active}
    after = {i: 0.0 for i in active}
    for first in range(0, rows, block_rows):
        count = min(block_rows, rows - first)
        start, stop = first * m, (first + count) * m
        if base_block is not None:
            base_block[: stop - start].copy_(deltas.base[start:stop])
        for i in active:
            block = tau[: stop - start]
            block.copy_(deltas.experts[i][start:stop])
            if base_block is not None:
                block.sub_(base_block[: stop - start])
            magnitude = torch.bitwise_and(block.view(int_dtype), magnitude_mask, out=key[: stop - start])
            before[i] += _l1(magnitude.view(deltas.dtype).view(count, m))  # the bits of |τ|
            keys, midrank = _midranks(magnitude.view(count, m), shift)  # mid-rank + ½ per key
            low, high = ranges[i]
            v = draws[: stop - start].uniform_(low, high, generator=generators[i]).to(device, non_blocking=True)
            keep = torch.lt(v, midrank.index_select(0, keys), out=chosen[: stop - start]).view(torch.uint8)
            kept[i] += int(torch.count_nonzero(keep))
            after[i] += _l1(block.abs_().mul_(keep).view(count, m))
            pack_bits(keep, bits[i][start // 8 :])  # blocks start on whole bytes
    for i in active:
        keeps[i] = RankKeep(n, kept[i], bits[i])
        if 0 < kept[i] < n and before[i] >= RESCALE_EPS and after[i] >= RESCALE_EPS:
            scales[i] = before[i] / after[i]
    return keeps, scales  # type: ignore[return-value]


def _l1(values: torch.Tensor) -> float:
    """Σ of a (rows, m) block of non-negative values: float32 per row (each row one thread),
    then float64 over the rows, so the order does not depend on the thread count."""
    if values.shape[0] == 1:
        return stable_sum(values.view(-1))
    return float(values.sum(1).sum(dtype=torch.float64))


def _midranks(bits: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``bits`` (rows, m: |τ|'s bit patterns; overwritten) each entry's key into the
    returned table, and the table: the mean rank of the key's entries plus ½ (float32,
    0-based). Ranks compare |τ| at bf16 precision relative to the row's largest (BINS − 1
    steps of 1/128 octave below it, the rest in the bottom bin)."""
    key = bits.bitwise_right_shift_(shift)
    rows, m = key.shape
    top = key.amax(1, keepdim=True)
    if m < SHORT_ROW:  # a sort of short rows costs less than a table of BINS per row
        key = torch.maximum(key, top - (DELLA_BINS - 1), out=key)
        ordered = torch.sort(key, dim=1).values
        below = torch.searchsorted(ordered, key, side="left")
        through = torch.searchsorted(ordered, key, side="right")
        midrank = below.add_(through).to(torch.float32).mul_(0.5)  # below + count/2 = mean rank + ½
        index = torch.arange(rows * m, dtype=torch.int64, device=key.device)
        return index, midrank.view(-1)
    row_start = torch.arange(rows, dtype=key.dtype, device=key.device).mul_(DELLA_BINS).unsqueeze(1)  # (rows, 1)
    key.add_(row_start + (DELLA_BINS - 1) - top)  # the row's largest lands in its last bin
    torch.maximum(key, row_start, out=key)
    counts = torch.bincount(key.view(-1), minlength=rows * DELLA_BINS).view(rows, DELLA_BINS)
    through = torch.cumsum(counts, 1, dtype=torch.float32)  # entries in this bin and below
    return key.view(-1), through.sub_(counts, alpha=0.5).view(-1)  # below + (count − 1)/2 + ½


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


def rank_params_check(method: str, sparsifier: str | None):
    """The plan-time check (``MethodSpec.check_params``) of a method with this sparsifier."""
    if sparsifier not in ("magnitude_outliers", "della"):
        return None

    def check(where: str, models: Sequence[str], model_params: Sequence[Mapping[str, Any]], _: Mapping[str, Any]) -> None:
        check_rank_params(sparsifier, model_params, f"{method}, {where}", models)

    return check


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
    tau: torch.Tensor, density: float, epsilon: float = 0.15, *, seed: int = 0, rescale: Rescale = "l1"
) -> torch.Tensor:
    """τ with each entry kept with its rank's probability, then rescaled (module doc)."""
    deltas = Deltas([tau])
    keeps, l1 = della_keeps(deltas, tau.shape, [density], [epsilon], seed)
    scale = l1[0] if rescale == "l1" else keep_scales(deltas, keeps, [density], rescale)[0]
    return _sparsified(tau, deltas, keeps[0], scale)
