"""Sparsifiers of the task-arithmetic family: exact magnitude top-k and DARE's random drop.

A task vector τ = θ − θ₀ is never materialised whole: ``Deltas`` computes it chunk by
chunk (``CHUNK`` elements, a module constant) into a small reused buffer, so the
element-wise work stays in cache and no full float32 copy of an expert is made.

- ``magnitude(tau, density)`` keeps the k = int(d·n) entries of largest |τ| (at least one
  when d > 0); ties at the threshold are broken by position, lowest flat index first.
  The threshold is found exactly, without sorting, from histograms of the float bit
  patterns (non-negative floats order like their bits read as integers): 16 bits a level,
  two levels for float32, four for float64.
- ``dare(tau, density, generator=...)`` keeps each entry with probability d, the draws
  coming from a CPU ``torch.Generator`` in fixed ``CHUNK`` pieces, so they depend only on
  the tensor's size and the seed. With L1 rescaling the kept entries are multiplied by
  ‖τ‖₁ / ‖kept‖₁ (mergekit's choice); ``rescale="inverse"`` divides them by d instead.

Both are thin wrappers over the pieces the fused merge in ``task_arithmetic`` uses:
``topk_sets`` (selection), ``TopK.apply_`` / ``RandomKeep.apply_`` (masking one chunk)
and ``l1_scales`` (rescale factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal, Protocol, Sequence

import torch

from orchestrator.methods.base import compute_dtype

CHUNK = 1 << 18
"""Elements per chunk (1 MiB of float32). Fixed: results never depend on the machine."""

RESCALE_EPS = 1e-7
"""Below this L1 norm (of τ or of what is kept) L1 rescaling is skipped, as in mergekit."""

Rescale = Literal["l1", "inverse"] | None

_SUM_ROW = 1024
_LEVEL_BITS = 16
_BINS = 1 << _LEVEL_BITS
_SPREAD = 1024  # bins that entries outside a level's window are spread over


def kept_count(n: int, density: float) -> int:
    """How many of n entries a sparsifier with this density keeps (mergekit's rule)."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """The (start, stop) flat ranges a tensor of n elements is processed in."""
    return [(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]


def rescale_mode(value: bool | str) -> Rescale:
    """A recipe's ``rescale`` value (true, false or "inverse") as a rescale mode."""
    if value == "inverse":
        return "inverse"
    return "l1" if value else None


class Deltas:
    """Task vectors τᵢ = θᵢ − θ₀ of one tensor, computed chunk by chunk in the compute dtype.

    ``base`` None means the experts already are task vectors. Inputs keep their stored
    dtype (bfloat16 views are fine); each chunk is cast on the way. ``dtype`` (default:
    float32, float64 for float64 inputs) is the dtype the inputs are cast to and τ is
    computed in: with a half dtype, τ = θᵢ − θ₀ rounded to it, as mergekit computes it.
    """

    def __init__(self, experts: Sequence[torch.Tensor], base: torch.Tensor | None = None, *, dtype: torch.dtype | None = None):
        self.experts = [e.reshape(-1) for e in experts]
        self.base = base.reshape(-1) if base is not None else None
        reference = self.base if self.base is not None else self.experts[0]
        self.n = reference.numel()
        self.device = reference.device
        self.dtype = dtype or compute_dtype(base, *experts)
        # The base is upcast once per chunk into a buffer, unless it is in the compute dtype.
        self._upcast_base = self.base is not None and self.base.dtype != self.dtype
        self._base_buffer = self.buffer() if self._upcast_base else None
        self._base_chunk: torch.Tensor | None = None

    def buffer(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A scratch tensor of one chunk."""
        return torch.empty(min(CHUNK, self.n), dtype=dtype or self.dtype, device=self.device)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Walk the chunks; the base's chunk is upcast once per chunk, for every expert."""
        for start, stop in chunk_bounds(self.n):
            if self._upcast_base:
                self._base_chunk = self._base_buffer[: stop - start].copy_(self.base[start:stop])
            elif self.base is not None:
                self._base_chunk = self.base[start:stop]
            yield start, stop
        self._base_chunk = None

    def base_chunk(self, start: int, stop: int) -> torch.Tensor:
        """θ₀[start:stop] in the compute dtype, read-only (it may be a view of the input);
        valid inside ``chunks()`` at that chunk."""
        return self._base_chunk

    def delta(self, i: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """τᵢ[start:stop] into ``out`` (a buffer); valid inside ``chunks()`` at that chunk."""
        out, expert = out[: stop - start], self.experts[i][start:stop]
        if self._base_chunk is None:
            return out.copy_(expert)
        if expert.dtype == self.dtype:
            return torch.sub(expert, self._base_chunk, out=out)
        return out.copy_(expert).sub_(self._base_chunk)  # cast first: faster than a mixed-dtype sub


class Keep(Protocol):
    """Which entries of a task vector a sparsifier keeps; applied one chunk at a time."""

    kept: int

    def apply_(self, chunk: torch.Tensor, start: int) -> None: ...


@dataclass(frozen=True)
class TopK:
    """The k entries of largest |τ|: those above ``threshold``, plus those equal to it
    whose flat index is below ``cut`` (lowest index first)."""

    n: int
    kept: int
    threshold: float = 0.0
    cut: int = 0
    below: float = 0.0  # the largest value of the compute dtype below ``threshold``

    def apply_(self, chunk: torch.Tensor, start: int) -> None:
        """Zero, in place, the entries of ``chunk`` (= τ[start:start+len]) not kept."""
        if self.kept >= self.n:
            return
        if self.kept == 0:
            chunk.zero_()
            return
        size = chunk.numel()
        split = min(max(self.cut - start, 0), size)  # before it |τ| ≥ t is kept, after |τ| > t
        if split > 0:
            _hardshrink_(chunk[:split], self.below)
        if split < size:
            _hardshrink_(chunk[split:], self.threshold)


def _hardshrink_(x: torch.Tensor, lambd: float) -> None:
    """x ← x where |x| > lambd else 0 (one vectorised pass; lambd is exact in x's dtype)."""
    torch.ops.aten.hardshrink.out(x, lambd, out=x)


@dataclass(frozen=True)
class RandomKeep:
    """DARE's draw: ``mask`` (bool, n) marks the kept entries; None keeps everything."""

    n: int
    kept: int
    mask: torch.Tensor | None

    def apply_(self, chunk: torch.Tensor, start: int) -> None:
        if self.kept == 0:
            chunk.zero_()
        elif self.mask is not None:
            chunk.mul_(self.mask[start : start + chunk.numel()])


def random_keep(n: int, density: float, generator: torch.Generator, device: torch.device | str = "cpu") -> RandomKeep:
    """Keep each of n entries with probability ``density``: u < d with u ~ U[0, 1) float32.

    Draws nothing when d ≥ 1 (identity) or d ≤ 0 (all dropped). Draws are made on the
    CPU in ``CHUNK`` pieces, so they depend only on n and the generator's state.
    """
    if density >= 1:
        return RandomKeep(n, n, None)
    if density <= 0:
        return RandomKeep(n, 0, torch.zeros(n, dtype=torch.bool, device=device))
    mask = torch.empty(n, dtype=torch.bool)
    uniform = torch.empty(min(CHUNK, n), dtype=torch.float32)
    for start, stop in chunk_bounds(n):
        draws = torch.rand(stop - start, generator=generator, out=uniform[: stop - start])
        torch.lt(draws, density, out=mask[start:stop])
    kept = int(torch.count_nonzero(mask))
    return RandomKeep(n, kept, mask.to(device))


def topk_sets(deltas: Deltas, ranks: Sequence[Sequence[int]]) -> list[list[TopK]]:
    """For each task vector i and each k in ``ranks[i]``, the exact set of its k largest |τᵢ|.

    A histogram of 16 bits of |τ|'s bit pattern a level (``bincount``), walking down from
    the top bits: each level finds the bucket holding the k-th largest entry and narrows
    to it. The last level gives the k-th largest value t exactly and how many entries
    equal to t must be kept; only when that is fewer than all of them, one more pass
    finds the flat index where they stop. Ranks of one vector share its passes.
    """
    n = deltas.n
    results: list[list[TopK | None]] = [[None] * len(r) for r in ranks]
    pending: dict[tuple[int, int], list[int]] = {}  # (vector, query) → [prefix bits, rank still needed]
    for i, vector_ranks in enumerate(ranks):
        for j, k in enumerate(vector_ranks):
            if k <= 0:
                results[i][j] = TopK(n, 0)
            elif k >= n:
                results[i][j] = TopK(n, n)
            else:
                pending[(i, j)] = [0, k]
    if not pending:
        return results  # type: ignore[return-value]

    int_dtype, magnitude_mask, shifts = _bit_layout(deltas.dtype)
    values = deltas.buffer()
    bits = deltas.buffer(int_dtype)
    keys = deltas.buffer(int_dtype)
    spread = deltas.buffer(int_dtype)
    equal_counts: dict[tuple[int, int], int] = {}
    for shift in shifts:
        windows: dict[int, dict[int, torch.Tensor]] = {}  # vector → prefix → histogram
        for (i, _), (prefix, _) in pending.items():
            windows.setdefault(i, {})[prefix] = torch.zeros(_BINS + _SPREAD, dtype=torch.int64, device=deltas.device)
        for start, stop in deltas.chunks():
            size = stop - start
            for i, histograms in windows.items():
                level = _magnitude_bits(deltas.delta(i, start, stop, values), magnitude_mask, bits[:size])
                if shift:
                    level.bitwise_right_shift_(shift)
                for prefix, histogram in histograms.items():
                    key = level if shift == shifts[0] else _window_key(level, prefix, keys[:size], spread[:size])
                    histogram += torch.bincount(key, minlength=_BINS + _SPREAD)[: _BINS + _SPREAD]
        for query, state in pending.items():
            counts = windows[query[0]][state[0]][:_BINS]
            bucket, above = _bucket_of_rank(counts, state[1])
            state[0] = (state[0] << _LEVEL_BITS) | bucket
            state[1] -= above
            if shift == 0:
                equal_counts[query] = int(counts[bucket])

    cuts = _tie_cuts(deltas, pending, equal_counts, magnitude_mask, int_dtype)
    for (i, j), (threshold_bits, _) in pending.items():
        threshold = torch.tensor(threshold_bits, dtype=int_dtype).view(deltas.dtype)
        below = torch.nextafter(threshold, torch.tensor(-math.inf, dtype=deltas.dtype))
        results[i][j] = TopK(n, ranks[i][j], threshold.item(), cuts.get((i, j), n), below.item())
    return results  # type: ignore[return-value]


def _bit_layout(dtype: torch.dtype) -> tuple[torch.dtype, int, tuple[int, ...]]:
    """Integer view, mask of the magnitude bits, and the shift of each 16-bit level."""
    if dtype == torch.float32:
        return torch.int32, 0x7FFF_FFFF, (16, 0)
    if dtype == torch.float64:
        return torch.int64, 0x7FFF_FFFF_FFFF_FFFF, (48, 32, 16, 0)
    raise TypeError(f"magnitude selection computes in float32 or float64, not {dtype}")


def _magnitude_bits(values: torch.Tensor, magnitude_mask: int, out: torch.Tensor) -> torch.Tensor:
    """|values| as integers that order like the magnitudes (the sign bit cleared)."""
    return torch.bitwise_and(values.view(out.dtype), magnitude_mask, out=out)


def _window_key(level: torch.Tensor, prefix: int, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Histogram keys for the window of entries whose bits above this level equal ``prefix``.

    Inside the window the key is the level's 16 bits (0..65535). Outside, it is spread
    over ``_SPREAD`` spare bins by the entry's bits just above the level, which differ
    between entries outside the window (the low bits of bf16-born values are mostly
    zero): ``bincount`` slows down several times when most entries hit one counter,
    and those counts are not needed.
    """
    key = torch.bitwise_xor(level, prefix << _LEVEL_BITS, out=out)  # < 65536 exactly inside the window
    spare = torch.bitwise_right_shift(level, _LEVEL_BITS, out=scratch).bitwise_and_(_SPREAD - 1).add_(_BINS)
    return torch.minimum(key, spare, out=key)


def _bucket_of_rank(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the rank-th largest entry (rank ≥ 1), and how many lie above it."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([rank], device=counts.device)))
    bucket = counts.numel() - 1 - position
    above = int(from_top[position]) - int(counts[bucket])
    return bucket, above


def _tie_cuts(
    deltas: Deltas,
    pending: dict[tuple[int, int], list[int]],
    equal_counts: dict[tuple[int, int], int],
    magnitude_mask: int,
    int_dtype: torch.dtype,
) -> dict[tuple[int, int], int]:
    """For sets that keep only some of the entries equal to their threshold: the flat index
    just past the last one kept (the r-th equal entry in flat order)."""
    open_: dict[tuple[int, int], list[int]] = {  # query → [threshold bits, still to keep]
        query: [state[0], state[1]] for query, state in pending.items() if state[1] < equal_counts[query]
    }
    cuts: dict[tuple[int, int], int] = {}
    if not open_:
        return cuts
    values = deltas.buffer()
    bits = deltas.buffer(int_dtype)
    equal = deltas.buffer(torch.bool)
    for start, stop in deltas.chunks():
        size = stop - start
        for i in sorted({query[0] for query in open_}):
            level = _magnitude_bits(deltas.delta(i, start, stop, values), magnitude_mask, bits[:size])
            for query in [q for q in open_ if q[0] == i]:
                threshold_bits, remaining = open_[query]
                hits = torch.eq(level, threshold_bits, out=equal[:size])
                found = int(torch.count_nonzero(hits))
                if found >= remaining:
                    position = int(torch.nonzero(hits)[remaining - 1])
                    cuts[query] = start + position + 1
                    del open_[query]
                else:
                    open_[query][1] -= found
        if not open_:
            break
    return cuts


def stable_sum(values: torch.Tensor) -> float:
    """Σ values (1-D), in an order that does not depend on the thread count.

    A plain ``sum`` of a large 1-D tensor splits the work by thread, so its rounding
    changes with ``torch.get_num_threads()`` (a worker process may run with fewer
    threads). Rows of a fixed width are each reduced by one thread (in the values'
    dtype, which is fast), then the few row sums and the tail, below torch's parallel
    grain, are added in float64.
    """
    rows = values.numel() // _SUM_ROW
    total = float(values[rows * _SUM_ROW :].sum(dtype=torch.float64))
    if rows:
        total += float(values[: rows * _SUM_ROW].view(rows, _SUM_ROW).sum(1).sum(dtype=torch.float64))
    return total


def l1_scales(deltas: Deltas, keeps: Sequence[Keep]) -> list[float]:
    """‖τᵢ‖₁ / ‖kept τᵢ‖₁ for each task vector (1 where either norm is below RESCALE_EPS,
    or where the sparsifier keeps everything or nothing)."""
    todo = [i for i, keep in enumerate(keeps) if 0 < keep.kept < deltas.n]
    before = {i: 0.0 for i in todo}
    after = {i: 0.0 for i in todo}
    if todo:
        values = deltas.buffer()
        for start, stop in deltas.chunks():
            for i in todo:
                chunk = deltas.delta(i, start, stop, values).abs_()
                before[i] += stable_sum(chunk)
                keeps[i].apply_(chunk, start)
                after[i] += stable_sum(chunk)
    scales = [1.0] * len(keeps)
    for i in todo:
        if before[i] >= RESCALE_EPS and after[i] >= RESCALE_EPS:
            scales[i] = before[i] / after[i]
    return scales


def keep_scales(deltas: Deltas, keeps: Sequence[Keep], densities: Sequence[float], rescale: Rescale) -> list[float]:
    """The factor each sparsified task vector is multiplied by (1 without rescaling)."""
    if rescale == "l1":
        return l1_scales(deltas, keeps)
    if rescale == "inverse":
        return [1.0 / d if 0 < d < 1 else 1.0 for d in densities]
    return [1.0] * len(keeps)


def _sparsified(tau: torch.Tensor, keep: Keep, scale: float, deltas: Deltas) -> torch.Tensor:
    out = torch.empty(deltas.n, dtype=deltas.dtype, device=deltas.device)
    for start, stop in deltas.chunks():
        chunk = deltas.delta(0, start, stop, out[start:stop])
        keep.apply_(chunk, start)
        if scale != 1.0:
            chunk.mul_(scale)
    return out.view(tau.shape)


def magnitude(tau: torch.Tensor, density: float, *, rescale: Rescale = None) -> torch.Tensor:
    """τ with all but its k = int(d·n) largest-magnitude entries zeroed (see module doc)."""
    deltas = Deltas([tau])
    keep = topk_sets(deltas, [[kept_count(deltas.n, density)]])[0][0]
    scale = keep_scales(deltas, [keep], [density], rescale)[0]
    return _sparsified(tau, keep, scale, deltas)


def dare(
    tau: torch.Tensor, density: float, *, generator: torch.Generator, rescale: Rescale = "l1"
) -> torch.Tensor:
    """τ with each entry kept with probability d, then rescaled (see module doc)."""
    deltas = Deltas([tau])
    keep = random_keep(deltas.n, density, generator, deltas.device)
    scale = keep_scales(deltas, [keep], [density], rescale)[0]
    return _sparsified(tau, keep, scale, deltas)
