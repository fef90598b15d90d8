"""nearswap, arcee_fusion, ram and ramplus_tl against naive float64 references written here.

The references follow docs/methods.md with plain numpy loops; the code under test is the
chunked torch code, run on float64 inputs (so it computes in float64) and also with a tiny
chunk, so multi-chunk paths run on small data. Their half-precision arithmetic is checked
against mergekit itself (test_mergekit_half.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods import get_method, sparsify
from orchestrator.methods.base import TensorTask


@pytest.fixture(params=["real-chunks", "tiny-chunks"])
def chunking(request, monkeypatch):
    if request.param == "tiny-chunks":
        monkeypatch.setattr(sparsify, "CHUNK", 7)
    return request.param


def run(name, base, experts, global_params=None, *, compute_dtype=None):
    spec = get_method(name)
    g = {p.name: p.default for p in spec.global_params if not p.required}
    g.update(global_params or {})
    return spec.merge(TensorTask("t", base, experts, [{} for _ in experts], g, compute_dtype=compute_dtype)).tensor


def case(n_experts=3, shape=(6, 10), seed=0, scale=0.3, zero_fraction=0.0):
    """A base and experts; ``zero_fraction`` of each task vector's entries are exactly 0
    (so ram sees positions one expert, several, or none touch)."""
    g = np.random.default_rng(seed)
    base = g.normal(size=shape)
    taus = []
    for _ in range(n_experts):
        tau = g.normal(size=shape) * scale
        tau[g.random(size=shape) < zero_fraction] = 0.0
        taus.append(tau)
    return torch.tensor(base), [torch.tensor(base + t) for t in taus]


# ----------------------------------------------------------------------------- specs


def test_specs_follow_mergekit():
    expect = {"nearswap": (1, 1), "arcee_fusion": (1, 1), "ram": (1, None), "ramplus_tl": (1, None)}
    for name, (low, high) in expect.items():
        spec = get_method(name)
        assert spec.needs_base and not spec.uses_randomness and (spec.min_experts, spec.max_experts) == (low, high), name
        assert not spec.model_params
    p = lambda name, param: get_method(name).param(param)  # noqa: E731
    assert p("nearswap", "t").required
    assert p("ram", "epsilon").default == 1e-5 and p("ramplus_tl", "epsilon").default == 1e-5
    assert p("ramplus_tl", "r").default == 0.1 and p("ramplus_tl", "alpha").default == 0.2
    assert not get_method("arcee_fusion").global_params
    assert get_method("arcee_fusion").mergekit_result_float32 and get_method("ramplus_tl").mergekit_result_float32
    assert not get_method("ram").mergekit_result_float32 and not get_method("nearswap").mergekit_result_float32


# ----------------------------------------------------------------------------- nearswap


def ref_nearswap(base, other, t):
    a, b = base.numpy().ravel(), other.numpy().ravel()
    out = np.empty_like(a)
    for i in range(a.size):
        w = min(max(t / max(abs(a[i] - b[i]), 1e-6), 0.0), 1.0)
        out[i] = w * b[i] + (1 - w) * a[i]
    return out.reshape(base.shape)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 10.0])
def test_nearswap_matches_reference(chunking, t):
    base, experts = case(1, shape=(9, 13))
    experts[0].view(-1)[:5] = base.view(-1)[:5]  # equal entries: the 1e-6 floor, w = 1 unless t = 0
    got = run("nearswap", base, experts, {"t": t})
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_nearswap(base, experts[0], t), rtol=1e-12, atol=1e-15)
    if t >= 10:
        assert torch.equal(got, experts[0])  # every entry is within t: the other model's value
    if t == 0:
        assert torch.equal(got, base)


def test_nearswap_needs_t_and_exactly_one_other():
    base, experts = case(2)
    with pytest.raises(MergeError, match="exactly one other"):
        run("nearswap", base, experts, {"t": 0.1})
    with pytest.raises(RecipeError, match="'t' is required"):
        get_method("nearswap").merge(TensorTask("t", base, experts[:1], [{}], {}))


# ----------------------------------------------------------------------------- ram


def ref_ram(base, experts, epsilon, factors=None):
    b = base.numpy().ravel()
    taus = [e.numpy().ravel() - b for e in experts]
    out = b.copy()
    for p in range(b.size):
        touching = [i for i, tau in enumerate(taus) if abs(tau[p]) > epsilon]
        for i in touching:
            if len(touching) == 1:
                out[p] += taus[i][p] * (factors[i] if factors else 1.0)
            else:
                out[p] += taus[i][p] / len(touching)
    return out.reshape(base.shape)


def ref_ramplus_factors(base, experts, epsilon, r, alpha):
    b = base.numpy().ravel()
    touched = [np.abs(e.numpy().ravel() - b) > epsilon for e in experts]
    counts = sum(t.astype(int) for t in touched)
    factors = []
    for t in touched:
        shared = int(np.sum(t & (counts > 1)))
        unique = int(np.sum(t & (counts == 1)))
        factors.append(1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha))
    return factors


@pytest.mark.parametrize("n_experts", [1, 2, 4])
def test_ram_matches_reference(chunking, n_experts):
    base, experts = case(n_experts, shape=(7, 11), zero_fraction=0.5)
    got = run("ram", base, experts, {"epsilon": 1e-3})
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_ram(base, experts, 1e-3), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 5.0), (2.0, 0.05)])
def test_ramplus_tl_matches_reference(chunking, r, alpha):
    base, experts = case(3, shape=(8, 9), zero_fraction=0.6)
    factors = ref_ramplus_factors(base, experts, 1e-3, r, alpha)
    assert all(f > 1.0 for f in factors)  # the factors matter here
    assert len(set(factors)) > 1 or all(f == 1 + r * alpha for f in factors)  # distinct, or all capped at α
    got = run("ramplus_tl", base, experts, {"epsilon": 1e-3, "r": r, "alpha": alpha})
    assert got.dtype == torch.float64
    # λᵢ are float32 numbers in mergekit (so here): compare at float32 precision of λ
    np.testing.assert_allclose(got.numpy(), ref_ram(base, experts, 1e-3, factors), rtol=1e-6, atol=1e-7)
    assert not np.allclose(got.numpy(), ref_ram(base, experts, 1e-3), atol=1e-6)  # differs from plain ram


def test_ram_epsilon_and_no_experts():
    base, experts = case(2, zero_fraction=0.0, scale=1e-4)
    assert torch.equal(run("ram", base, experts, {"epsilon": 1.0}), base)  # no change is above ε
    with pytest.raises(RecipeError, match="epsilon"):
        run("ram", base, experts, {"epsilon": -1.0})
    assert torch.equal(run("ram", base, []), base)


# ----------------------------------------------------------------------------- arcee_fusion


def ref_fusion(base, other):
    a, b = base.numpy(), other.numpy()
    rows = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    rows_b = b.reshape(rows.shape)
    importance = np.empty_like(rows)
    for r in range(rows.shape[0]):
        p = np.exp(rows_b[r] - rows_b[r].max())
        p = p / p.sum() + 1e-8
        q = np.exp(rows[r] - rows[r].max())
        q = q / q.sum() + 1e-8
        kl = float(np.sum(p * np.log(p / q)))
        importance[r] = np.abs(rows_b[r] - rows[r]) * kl
    ordered = np.sort(importance.ravel())
    n = ordered.size
    quartiles = [ordered[int(np.float32(q) * np.float32(n - 1))] for q in (0.25, 0.5, 0.75)]
    fence = quartiles[1] + 1.5 * (quartiles[2] - quartiles[0])
    chosen = importance >= fence
    return np.where(chosen, rows_b, rows).reshape(a.shape), chosen


@pytest.mark.parametrize("shape", [(40, 30), (200,), (3, 5, 12)])
def test_arcee_fusion_matches_reference(chunking, shape):
    base, experts = case(1, shape=shape, scale=0.5)
    expected, chosen = ref_fusion(base, experts[0])
    assert 0 < chosen.mean() < 0.5  # some entries pass the fence, most do not
    got = run("arcee_fusion", base, experts)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-15)


def test_arcee_fusion_result_is_float32_for_half_inputs():
    """mergekit's float32 mask promotes its result: for bfloat16 the fused entries are the
    base plus the bfloat16 difference, summed in float32."""
    base, experts = case(1, shape=(16, 24), scale=0.5)
    b16, e16 = base.bfloat16(), experts[0].bfloat16()
    got = run("arcee_fusion", b16, [e16], compute_dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    changed = got != b16.float()
    difference = (e16 - b16).float()  # rounded to bfloat16 first
    assert bool(changed.any())
    assert torch.equal(got[changed], (b16.float() + difference)[changed])


def test_arcee_fusion_and_nearswap_refuse_wrong_inputs():
    base, experts = case(2)
    with pytest.raises(MergeError, match="exactly one other"):
        run("arcee_fusion", base, experts)
    with pytest.raises(MergeError, match="architecture"):
        run("arcee_fusion", base, [torch.zeros(3, 3, dtype=torch.float64)])


def test_half_precision_results_use_the_compute_dtype():
    base, experts = case(3, shape=(10, 12), zero_fraction=0.3)
    b16, e16 = base.bfloat16(), [e.bfloat16() for e in experts]
    assert run("ram", b16, e16, compute_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert run("ramplus_tl", b16, e16, compute_dtype=torch.bfloat16).dtype == torch.float32
    assert run("nearswap", b16, e16[:1], {"t": 0.1}, compute_dtype=torch.float16).dtype == torch.float16
    # without a compute dtype the float path upcasts: float32 results from bfloat16 inputs
    assert run("ram", b16, e16).dtype == torch.float32
    assert not math.isnan(float(run("ramplus_tl", b16, e16).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fusion_quartiles_are_the_sorted_values(dtype):
    """The half-precision histogram (and kthvalue otherwise) read the same values a sort
    puts at those positions: negative values, −0 and +0 included."""
    from orchestrator.methods.arcee_fusion import order_statistics

    g = torch.Generator().manual_seed(4)
    values = (torch.randn(50_001, generator=g) * 3).to(dtype)
    values[:40] = 0.0
    values[40:55] = -0.0
    ranks = [0, 7, 12_500, 25_000, 37_500, 50_000]
    ordered = torch.sort(values).values
    for rank, value in zip(ranks, order_statistics(values, ranks)):
        assert value.dtype == dtype and float(value) == float(ordered[rank]), rank
