"""Geometry of whole tensors for the spherical and statistical methods.

Every one of slerp, nuslerp, multislerp, karcher and model_stock is, per tensor (or per
row), a linear combination Σ cᵢxᵢ (+ θ₀) of its inputs whose coefficients depend only on
the inputs' inner products. So they run in two streaming passes: ``gram`` (or
``row_gram``) collects the inner products, a few scalars are computed in float64, and
``combine`` (or a per-row block loop) writes the output. No full float32 copy of an
input is made, and the iterations of karcher run on an N × N matrix, not on tensors.

Sums are float64 and taken in an order that depends neither on the thread count nor on
the chunking (``stable_sum`` / ``row_sums``), so every shard and worker gives the same bytes.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from orchestrator.methods import sparsify
from orchestrator.methods.sparsify import Deltas, stable_sum

_SUM_WIDTH = 1024


def gram(deltas: Deltas) -> np.ndarray:
    """G[i, j] = ⟨xᵢ, xⱼ⟩ (float64, symmetric) of the vectors ``deltas`` yields (τᵢ, or the
    tensors themselves when it has no base)."""
    count = len(deltas.experts)
    g = np.zeros((count, count))
    if deltas.n == 0:
        return g
    buffers = [deltas.buffer() for _ in range(count)]
    product = deltas.buffer()
    for start, stop in deltas.chunks():
        size = stop - start
        xs = [deltas.delta(i, start, stop, buffers[i]) for i in range(count)]
        for i in range(count):
            for j in range(i, count):
                g[i, j] += stable_sum(torch.mul(xs[i], xs[j], out=product[:size]))
    return np.triu(g) + np.triu(g, 1).T


def combine(deltas: Deltas, coefficients: Sequence[float], *, base_coefficient: float = 1.0) -> torch.Tensor:
    """base_coefficient·θ₀ + Σ cᵢxᵢ as a flat tensor (θ₀ term only when ``deltas`` has a base)."""
    out = torch.empty(deltas.n, dtype=deltas.dtype, device=deltas.device)  # (n,)
    scratch = deltas.buffer()
    coefficients = [float(c) for c in coefficients]
    for start, stop in deltas.chunks():
        chunk = out[start:stop]
        if deltas.base is not None:
            torch.mul(deltas.base_chunk(start, stop), base_coefficient, out=chunk)
        else:
            chunk.zero_()
        for i, c in enumerate(coefficients):
            chunk.add_(deltas.delta(i, start, stop, scratch), alpha=c)
    return out


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ over each row of ``x`` (rows, cols), float64, in a thread-independent order: rows
    are cut into pieces of 1024 that one thread each reduces, then the few partial sums."""
    rows, cols = x.shape
    if cols <= _SUM_WIDTH:
        if rows == 1:
            return torch.tensor([stable_sum(x[0])], dtype=torch.float64, device=x.device)
        return x.sum(1, dtype=torch.float64)
    x = x.contiguous()
    pieces = cols // _SUM_WIDTH
    head = x.as_strided((rows, pieces, _SUM_WIDTH), (cols, _SUM_WIDTH, 1)).sum(2, dtype=torch.float64).sum(1)
    if pieces * _SUM_WIDTH < cols:
        head += x[:, pieces * _SUM_WIDTH :].sum(1, dtype=torch.float64)
    return head


class Rows:
    """Row blocks of some inputs seen as (rows, cols) matrices, as task vectors of ``base``
    (or as they are without one), upcast to the compute dtype a block at a time.

    ``rows``/``cols`` default to (numel / last dim, last dim); a 0- or 1-D tensor is one row.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, rows: int, cols: int):
        self.deltas = Deltas(tensors, base)  # flat views and the compute dtype
        self.rows, self.cols = rows, cols
        self.block_rows = max(1, sparsify.CHUNK // max(cols, 1))
        size = min(self.block_rows, max(rows, 1)) * cols
        self.dtype, self.device = self.deltas.dtype, self.deltas.device
        self._x = [torch.empty(size, dtype=self.dtype, device=self.device) for _ in tensors]
        self._base = torch.empty(size, dtype=self.dtype, device=self.device) if base is not None else None

    @staticmethod
    def layout(shape: Sequence[int]) -> tuple[int, int]:
        n = int(np.prod(shape)) if len(shape) else 1
        cols = int(shape[-1]) if len(shape) >= 2 else n
        return (n // cols if cols else 0), cols

    def blocks(self) -> Iterator[tuple[int, int, list[torch.Tensor], torch.Tensor | None]]:
        """(first row, end row, [xᵢ block (r, cols)], θ₀ block (r, cols) or None)."""
        deltas = self.deltas
        for first in range(0, self.rows, self.block_rows):
            end = min(first + self.block_rows, self.rows)
            start, stop = first * self.cols, end * self.cols
            base = None
            if deltas.base is not None:
                base = self._base[: stop - start].copy_(deltas.base[start:stop]).view(end - first, self.cols)
            xs = []
            for i, tensor in enumerate(deltas.experts):
                x = self._x[i][: stop - start].copy_(tensor[start:stop]).view(end - first, self.cols)
                if base is not None:
                    x.sub_(base)
                xs.append(x)
            yield first, end, xs, base


def row_gram(rows: Rows) -> torch.Tensor:
    """Per-row inner products (rows, N, N), float64, of the vectors ``rows`` yields."""
    count = len(rows.deltas.experts)
    g = torch.zeros(rows.rows, count, count, dtype=torch.float64, device=rows.device)
    scratch = torch.empty(min(rows.block_rows, max(rows.rows, 1)) * rows.cols, dtype=rows.dtype, device=rows.device)
    for first, end, xs, _ in rows.blocks():
        product = scratch[: (end - first) * rows.cols].view(end - first, rows.cols)
        for i in range(count):
            for j in range(i, count):
                g[first:end, i, j] = row_sums(torch.mul(xs[i], xs[j], out=product))
                g[first:end, j, i] = g[first:end, i, j]
    return g


def column_gram(rows: Rows) -> torch.Tensor:
    """Per-column inner products (cols, N, N), float64: sums over the rows, block by block
    in row order (each column's sum runs in that fixed order)."""
    count = len(rows.deltas.experts)
    g = torch.zeros(rows.cols, count, count, dtype=torch.float64, device=rows.device)
    scratch = torch.empty(min(rows.block_rows, max(rows.rows, 1)) * rows.cols, dtype=rows.dtype, device=rows.device)
    for first, end, xs, _ in rows.blocks():
        product = scratch[: (end - first) * rows.cols].view(end - first, rows.cols)
        for i in range(count):
            for j in range(i, count):
                g[:, i, j] += torch.mul(xs[i], xs[j], out=product).to(torch.float64).sum(0)
    for i in range(count):
        for j in range(i + 1, count):
            g[:, j, i] = g[:, i, j]
    return g
