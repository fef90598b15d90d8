"""Naive references for the merge methods, in float64 numpy, one position at a time where
that keeps them obvious: written from the methods' specification (docs/methods.md), not
from the code under test. The method tests (test_methods.py, test_methods_more.py) share them."""

from __future__ import annotations

import numpy as np


def ref_kept(n: int, density: float) -> int:
    if density >= 1:
        return n
    if density <= 0:
        return 0
    return max(1, int(density * n))


def ref_order(tau) -> list[int]:
    """Positions by |τ| descending, ties by lowest index first."""
    flat = np.asarray(tau, dtype=np.float64).ravel()
    return sorted(range(flat.size), key=lambda j: (-abs(flat[j]), j))


def ref_top_positions(tau: np.ndarray, k: int) -> set[int]:
    """The k positions of largest |τ|, ties by lowest index."""
    return set(ref_order(tau)[:k])


def ref_magnitude(tau: np.ndarray, density: float) -> np.ndarray:
    keep = ref_top_positions(tau, ref_kept(tau.size, density))
    return np.array([tau[j] if j in keep else 0.0 for j in range(tau.size)])


def ref_family(
    base,
    experts,
    weights,
    *,
    sparsified=None,
    consensus=False,
    normalize=False,
    lam=1.0,
    protected=(),
    slack=0.0,
    densities=None,
    report=(),
):
    """θ₀ + λΔ of the task-arithmetic family, one position at a time, with ties_sv's rescue of the
    ``protected`` models' entries and the drop-rate report of the ``report`` models.
    ``sparsified`` gives each δᵢ (default: τᵢ)."""
    base = np.asarray(base, dtype=np.float64).ravel()
    taus = [np.asarray(e, dtype=np.float64).ravel() - base for e in experts]
    deltas = sparsified if sparsified is not None else taus
    n = base.size
    slack_sets = {p: ref_top_positions(taus[p], int(slack * n)) for p in protected}
    dropped = {p: 0 for p in report}
    out = np.empty(n)
    for j in range(n):
        x = [w * d[j] for w, d in zip(weights, deltas)]
        if not consensus:
            total, divisor = sum(x), sum(weights)
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        else:
            gamma = 1.0 if sum(x) >= 0 else -1.0
            agree = [np.sign(v) == gamma for v in x]
            rescued = [p for p in protected if x[p] != 0 and not agree[p] and j in slack_sets[p]]
            for p in report:
                if x[p] != 0 and not agree[p] and p not in rescued:
                    dropped[p] += 1
            if rescued:
                total, divisor = sum(x[p] for p in rescued), sum(weights[p] for p in rescued)
            else:
                total = sum(v for v, a in zip(x, agree) if a)
                divisor = sum(w for w, a in zip(weights, agree) if a)
            divisor = 1.0 if divisor == 0 else divisor
        delta = total / divisor if normalize else total
        out[j] = base[j] + lam * delta
    topk = [ref_kept(n, densities[p]) if densities else n for p in report]
    return out, {"protected_topk": topk, "protected_dropped": [dropped[p] for p in report]}


def ref_outliers(tau, density, gamma):
    flat = np.asarray(tau, dtype=np.float64).ravel()
    n = flat.size
    k = ref_kept(n, density)
    top = 0 if k >= n else min(int(gamma * n), n - k)
    keep = set(ref_order(flat)[top : top + k])
    return np.array([flat[j] if j in keep else 0.0 for j in range(n)])
