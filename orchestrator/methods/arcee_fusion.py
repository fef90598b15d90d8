"""arcee_fusion: take the other model's change only where it is unusually important.

With a = θ₀ (the base) and b = θ₁ (the one other model), per row (the last dimension; a
1-D tensor is one row), p = softmax(b) + 10⁻⁸ and q = softmax(a) + 10⁻⁸ over the row, and

    importance = |b − a| · KL,   KL = Σ_row p·log(p/q)      (one number per row)

The threshold is the upper outlier fence of the importances, median + 1.5·(Q3 − Q1), the
quartiles read off the sorted importances at positions ⌊q·(n − 1)⌋ (q = 0.25, 0.5, 0.75,
computed in float32). Then θ = a + (b − a)·[importance ≥ threshold].

As mergekit 0.1.5 in the compute dtype D (softmax, ratio, log, product, row sum, the fence
arithmetic all rounded to D; the mask is float32, so the result is float32 - mergekit
writes it so unless ``out_dtype`` says otherwise, and so does mergefleet under the
match-mergekit precision). One difference: above 10⁶ entries mergekit estimates the
quartiles from 10⁶ entries drawn at random (with replacement, from torch's global
generator); mergefleet takes the exact quartiles of all entries (``kthvalue``), so the
result does not depend on a random draw (in half precision one histogram of the values'
bit patterns finds the quartiles). Two passes over row blocks; the importances are kept
(n values in D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.methods import sparsify
from orchestrator.methods.base import MergeResult, MethodSpec, TensorTask, check_base_and_one_other, working_dtype
from orchestrator.methods.sparsify import chunk_bounds
from orchestrator.methods.vectors import Rows

SOFTMAX_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)
FENCE = 1.5


def importance(base: torch.Tensor, other: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """|b − a| times the row's KL(softmax(b) ‖ softmax(a)), flat, in ``dtype``."""
    rows, cols = Rows.layout(base.shape)
    block_rows = max(1, sparsify.CHUNK // max(cols, 1))
    out = torch.empty(rows * cols, dtype=dtype, device=base.device)  # (n,)
    flat_a, flat_b = base.reshape(-1), other.reshape(-1)
    for first in range(0, rows, block_rows):
        end = min(first + block_rows, rows)
        start, stop = first * cols, end * cols
        a = flat_a[start:stop].to(dtype).view(end - first, cols)
        b = flat_b[start:stop].to(dtype).view(end - first, cols)
        p = F.softmax(b, dim=-1) + SOFTMAX_EPS
        q = F.softmax(a, dim=-1) + SOFTMAX_EPS
        divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (rows, 1)
        torch.mul(torch.sub(b, a).abs_(), divergence, out=out[start:stop].view(end - first, cols))
    return out


def order_statistics(values: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """The values at 0-based positions ``ranks`` of ``values`` (flat) sorted, as 0-d tensors.

    In half precision one histogram of the 2¹⁶ bit patterns (made to order like the values)
    finds them all exactly; otherwise ``kthvalue``."""
    if values.dtype not in (torch.bfloat16, torch.float16):
        return [torch.kthvalue(values, k + 1).values for k in ranks]
    bits = values.view(torch.int16).to(torch.int32)
    ordered = torch.where(bits < 0, -32768 - bits, bits) + 32768  # −x below +x; −0 with +0
    counts = torch.bincount(ordered, minlength=1 << 16).cumsum(0)
    chosen = []
    for k in ranks:
        key = int(torch.searchsorted(counts, torch.tensor([k + 1]))) - 32768
        bits_of = key if key >= 0 else -32768 - key
        chosen.append(torch.tensor(bits_of, dtype=torch.int16).view(values.dtype))
    return chosen


def fence(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of the flat ``values``, a 0-d tensor of their dtype."""
    positions = (torch.tensor(QUARTILES) * (values.numel() - 1)).long().tolist()
    q1, median, q3 = order_statistics(values, positions)
    return median + FENCE * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """The fusion of ``other`` into ``base`` (module doc); float32 (float64 for float64)."""
    scores = importance(base, other, dtype=dtype)
    threshold = fence(scores)
    result_dtype = torch.promote_types(dtype, torch.float32)  # the float32 mask promotes
    out = torch.empty(scores.numel(), dtype=result_dtype, device=scores.device)
    flat_a, flat_b = base.reshape(-1), other.reshape(-1)
    for start, stop in chunk_bounds(scores.numel()):
        a = flat_a[start:stop].to(dtype)
        change = torch.sub(flat_b[start:stop].to(dtype), a).to(result_dtype)  # b − a rounded to D
        change.mul_(scores[start:stop] >= threshold)
        torch.add(a.to(result_dtype), change, out=out[start:stop])
    return out.view(base.shape)


def _merge(task: TensorTask) -> MergeResult:
    check_base_and_one_other(task, "arcee_fusion")
    return MergeResult(arcee_fusion(task.base, task.experts[0], dtype=task.half or working_dtype(task)))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="arcee_fusion",
        merge=_merge,
        needs_base=True,
        min_experts=1,
        max_experts=1,
        mergekit_result_float32=True,
        doc="the other model's change where its importance |Δ|·KL passes the upper outlier fence",
    ),
)
