"""The methods beyond linear/ties/DARE against naive references written from docs/methods.md.

References are plain numpy in float64 (loops where it keeps them obvious); the code under
test is the chunked torch code. Reference tests also run with a tiny chunk (and with the
histogram top-k instead of the small-tensor sort), so multi-chunk paths run on small data.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods import get_method, rank_sparsify, sparsify
from orchestrator.methods.base import MergeResult, TensorTask, tensor_seed
from tests.references import ref_family, ref_outliers

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(params=["real-chunks", "tiny-chunks"])
def chunking(request, monkeypatch):
    if request.param == "tiny-chunks":
        monkeypatch.setattr(sparsify, "CHUNK", 7)
        monkeypatch.setattr(rank_sparsify, "SMALL", 0)  # the histogram top-k, not the sort
        monkeypatch.setattr(rank_sparsify, "DELLA_BLOCK", 64)
    return request.param


def run(name, base, experts, model_params, global_params=None, *, seed=0, tensor="t") -> MergeResult:
    spec = get_method(name)
    g = {p.name: p.default for p in spec.global_params if not p.required}
    g.update(global_params or {})
    params = [{**{p.name: p.default for p in spec.model_params if not p.required}, **m} for m in model_params]
    return spec.merge(TensorTask(tensor, base, experts, params, g, seed=seed))


def case(n_experts=3, shape=(6, 10), seed=0, scale=0.3, quantise=False):
    g = np.random.default_rng(seed)
    base = g.normal(size=shape)
    taus = [g.normal(size=shape) * scale for _ in range(n_experts)]
    if quantise:
        taus = [np.round(t * 4) / 4 for t in taus]
    return torch.tensor(base), [torch.tensor(base + t) for t in taus]


def np_(t):
    return t.double().numpy()


# ----------------------------------------------------------------------------- specs


def test_specs_follow_mergekit():
    expect = {
        # name: (needs_base, optional_base, min_experts, max_experts)
        "breadcrumbs": (True, False, 1, None),
        "breadcrumbs_ties": (True, False, 1, None),
        "della": (True, False, 1, None),
        "della_linear": (True, False, 1, None),
        "slerp": (True, False, 1, 1),
        "nuslerp": (False, True, 2, 2),
        "multislerp": (False, True, 2, None),
        "karcher": (False, False, 1, None),
        "model_stock": (True, False, 2, None),
        "sce": (True, False, 1, None),
        "passthrough": (False, False, 1, 1),
    }
    for name, (needs, optional, low, high) in expect.items():
        spec = get_method(name)
        assert (spec.needs_base, spec.optional_base, spec.min_experts, spec.max_experts) == (needs, optional, low, high), name
    p = lambda name, param: get_method(name).param(param)  # noqa: E731
    assert p("breadcrumbs", "gamma").default == 0.01 and p("breadcrumbs_ties", "gamma").default == 0.01
    assert p("della", "epsilon").default == 0.15 and p("della_linear", "epsilon").default == 0.15
    assert p("breadcrumbs", "normalize").default is False and p("breadcrumbs_ties", "normalize").default is False
    assert p("della", "normalize").default is True and p("della_linear", "normalize").default is False
    assert p("della", "rescale").default is True and p("breadcrumbs", "rescale").default is False
    assert get_method("della").uses_randomness and get_method("della_linear").uses_randomness
    assert not get_method("breadcrumbs").uses_randomness
    assert all(get_method(m).sparsifies for m in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear"))
    assert p("slerp", "t").required
    assert p("nuslerp", "weight").required and p("multislerp", "weight").required
    assert p("nuslerp", "nuslerp_flatten").default is True and p("nuslerp", "nuslerp_row_wise").default is False
    assert p("multislerp", "normalize_weights").default is True and p("multislerp", "eps").default == 1e-8
    assert p("karcher", "max_iter").default == 10 and p("karcher", "tol").default == 1e-5
    assert p("karcher", "weight").default == 1.0  # ours: mergekit has no weight
    assert p("model_stock", "filter_wise").default is False
    assert p("sce", "select_topk").default == 1.0
    assert p("passthrough", "scale").default is None


# ----------------------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("density,gamma", [(0.3, 0.01), (0.3, 0.1), (0.5, 0.0), (0.9, 0.3), (0.05, 0.5), (1.0, 0.2), (0.0, 0.1)])
def test_magnitude_outliers_matches_reference(chunking, density, gamma):
    tau = np.random.default_rng(3).normal(size=(7, 9))
    tau.ravel()[::4] = 0.5  # a block of equal magnitudes, both signs
    tau.ravel()[1::7] = -0.5
    got = rank_sparsify.magnitude_outliers(torch.tensor(tau), density, gamma)
    assert got.shape == tau.shape
    np.testing.assert_array_equal(got.numpy().ravel(), ref_outliers(tau, density, gamma))


def test_magnitude_outliers_edges():
    tau = torch.tensor([4.0, -3.0, 2.0, -1.0, 0.5])
    assert rank_sparsify.magnitude_outliers(tau, 0.4, 0.2).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]
    assert rank_sparsify.magnitude_outliers(tau, 0.4, 0.0).tolist() == [4.0, -3.0, 0.0, 0.0, 0.0]  # γ = 0: top-k
    assert torch.equal(rank_sparsify.magnitude_outliers(tau, 1.0, 0.4), tau)  # density 1: identity
    # the top cut shrinks so that k remain: k = 4, so only one is dropped from the top
    assert rank_sparsify.magnitude_outliers(tau, 0.8, 0.6).tolist() == [0.0, -3.0, 2.0, -1.0, 0.5]
    l1 = rank_sparsify.magnitude_outliers(tau.double(), 0.4, 0.2, rescale="l1")
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-12)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_reference(chunking, name):
    base, experts = case(4, (8, 9), seed=5, quantise=True)
    weights, densities, gammas = [1.0, 0.5, 2.0, -0.7], [0.3, 0.5, 1.0, 0.2], [0.05, 0.0, 0.1, 0.3]
    params = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)]
    for normalize, lam in ((False, 1.0), (True, 0.6)):
        got = run(name, base, experts, params, {"normalize": normalize, "lambda": lam})
        sparse = [ref_outliers(np_(e - base), d, g) for e, d, g in zip(experts, densities, gammas)]
        expected, _ = ref_family(np_(base), list(map(np_, experts)), weights, sparsified=sparse, consensus=name.endswith("ties"), normalize=normalize, lam=lam)
        np.testing.assert_allclose(np_(got.tensor).ravel(), expected, rtol=0, atol=1e-12)
        assert got.tensor.dtype == torch.float64 and got.tensor.shape == base.shape


def test_breadcrumbs_rejects_gamma_outside_unit_interval():
    base, experts = case(2)
    with pytest.raises(RecipeError, match=r"breadcrumbs, tensor 't', expert 1: parameter 'gamma'"):
        run("breadcrumbs", base, experts, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5, "gamma": 1.5}])


# ----------------------------------------------------------------------------- DELLA


def ref_della_mask(tau, density, epsilon, seed, expert=0):
    """docs/methods.md's DELLA draw, naively: the mid-rank of each entry's |τ| in its row (at
    bf16 precision, a bottom bin 2¹⁶ below the row's largest); kept with probability
    (d − ε) + 2ε·rank/(m − 1), drawn as v ~ uniform_ in rank space (rank_sparsify's doc)."""
    tau32 = np.ascontiguousarray(np.asarray(tau, dtype=np.float32))
    m = tau32.shape[-1] if tau32.ndim >= 2 else tau32.size
    rows = tau32.reshape(-1, m)
    keys = (rows.view(np.int32) & 0x7FFFFFFF) >> 16
    block = rank_sparsify.della_block_rows(m, rows.shape[0])
    generator = torch.Generator().manual_seed(rank_sparsify.della_seed(seed, expert))
    if m == 1:
        low, high = 0.5 - density, 1.5 - density
    else:
        span = (m - 1) / (2 * epsilon)
        low, high = 0.5 - (density - epsilon) * span, 0.5 + (1 - density + epsilon) * span
    mask = np.zeros(rows.shape, dtype=bool)
    for first in range(0, rows.shape[0], block):
        end = min(first + block, rows.shape[0])
        v = torch.empty((end - first) * m).uniform_(low, high, generator=generator).numpy().reshape(end - first, m)
        for r in range(first, end):
            key = np.maximum(keys[r], keys[r].max() - (rank_sparsify.DELLA_BINS - 1))
            for c in range(m):
                below, equal = int((key < key[c]).sum()), int((key == key[c]).sum())
                midrank = below + (equal - 1) / 2  # 0-based mean rank of the tied entries
                mask[r, c] = v[r - first, c] < midrank + 0.5
    return mask.reshape(np.shape(tau))


def test_della_draw_has_the_rank_probability():
    """The rank-space draw is the probability docs/methods.md gives: (d − ε) + 2ε·rank/(m − 1)."""
    m, density, epsilon = 5, 0.4, 0.3
    tau = torch.arange(1, m + 1, dtype=torch.float32).repeat(40_000, 1)  # ranks 0..4 in every row
    kept = rank_sparsify.della(tau, density, epsilon, seed=3, rescale=None) != 0
    expected = (density - epsilon) + 2 * epsilon * np.arange(m) / (m - 1)
    sigma = np.sqrt(expected * (1 - expected) / 40_000)
    assert np.all(np.abs(kept.float().mean(0).numpy() - expected) < 4 * sigma)
    single = rank_sparsify.della(torch.ones(100_000, 1), 0.3, 0.2, seed=1, rescale=None) != 0  # m = 1: p = d
    assert abs(float(single.float().mean()) - 0.3) < 4 * np.sqrt(0.21 / 100_000)


@pytest.mark.parametrize("shape", [(9, 13), (40,), (5, 1), (3, 300)])
def test_della_mask_matches_reference(chunking, shape):
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    tau.view(-1)[::3] = 0.25  # ties share their mid-rank
    for density, epsilon in ((0.5, 0.3), (0.2, 0.15)):
        got = rank_sparsify.della(tau, density, epsilon, seed=9, rescale=None)
        mask = ref_della_mask(tau.numpy(), density, epsilon, 9)
        np.testing.assert_array_equal(got.numpy(), np.where(mask, tau.numpy(), 0.0))


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_merge_matches_reference_given_its_masks(chunking, name):
    base, experts = case(3, (6, 11), seed=8)
    weights, densities, epsilons = [1.0, 0.5, 2.0], [0.5, 0.3, 0.7], [0.2, 0.1, 0.25]
    seed = tensor_seed(4, "model.layers.1.mlp.up_proj.weight")
    params = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    got = run(name, base, experts, params, seed=seed)
    sparse = []
    for i, (e, d, eps) in enumerate(zip(experts, densities, epsilons)):
        tau = np_(e - base)
        kept = tau * ref_della_mask(tau, d, eps, seed, expert=i)
        sparse.append((kept * np.abs(tau).sum() / np.abs(kept).sum()).ravel())  # L1 rescale
    expected, _ = ref_family(np_(base), list(map(np_, experts)), weights, sparsified=sparse, consensus=name == "della", normalize=name == "della")
    np.testing.assert_allclose(np_(got.tensor).ravel(), expected, rtol=0, atol=1e-12)


def test_della_statistics():
    """Kept fraction within 3σ of the density; the ranks steer it; L1 rescale exact."""
    rows, m = 256, 1024
    tau = torch.randn(rows, m, generator=torch.Generator().manual_seed(1))
    for density, epsilon in ((0.2, 0.15), (0.5, 0.4), (0.8, 0.1)):
        kept = rank_sparsify.della(tau, density, epsilon, seed=3, rescale=None) != 0
        ranks = np.arange(m) / (m - 1)
        p = (density - epsilon) + 2 * epsilon * ranks
        sigma = math.sqrt(rows * float((p * (1 - p)).sum()))
        assert abs(int(kept.sum()) - density * rows * m) < 3 * sigma
        order = tau.abs().argsort(1)
        top = kept.gather(1, order[:, -m // 10 :]).float().mean()  # the largest tenth of each row
        bottom = kept.gather(1, order[:, : m // 10]).float().mean()
        assert abs(float(top) - (density + 0.9 * epsilon)) < 0.02
        assert abs(float(bottom) - (density - 0.9 * epsilon)) < 0.02
    rescaled = rank_sparsify.della(tau.double(), 0.3, 0.2, seed=3)
    assert float(rescaled.abs().sum()) == pytest.approx(float(tau.double().abs().sum()), rel=1e-12)
    assert torch.equal(rank_sparsify.della(tau, 1.0, 0.5), tau)  # d = 1: identity


def test_della_bounds_are_checked():
    base, experts = case(2)
    bad = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.1, "epsilon": 0.15}]
    for name in ("della", "della_linear"):
        with pytest.raises(RecipeError, match=rf"{name}, tensor 't', expert 1: della needs density ± epsilon inside \(0, 1\)"):
            run(name, base, experts, bad)
    with pytest.raises(RecipeError, match="epsilon below 0.1"):
        rank_sparsify.della(torch.ones(4, 4), 0.9, 0.1)
    # density 1 (identity) needs no check, as in mergekit
    run("della", base, experts, [{"weight": 1.0, "density": 1.0, "epsilon": 0.5}] * 2)


def test_della_is_deterministic_and_thread_independent():
    base, experts = case(3, (64, 96), seed=6)
    params = [{"weight": 1.0, "density": 0.4}] * 3
    seed_a, seed_b = tensor_seed(0, "a"), tensor_seed(0, "b")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("della", base.float(), [e.float() for e in experts], params, seed=seed_a).tensor
        torch.set_num_threads(2)
        two = run("della", base.float(), [e.float() for e in experts], params, seed=seed_a).tensor
    finally:
        torch.set_num_threads(before)
    assert one.numpy().tobytes() == two.numpy().tobytes()
    other = run("della", base.float(), [e.float() for e in experts], params, seed=seed_b).tensor
    assert not torch.equal(one, other)


def test_della_bfloat16_inputs_equal_their_float32_upcast():
    base, experts = case(2, (16, 64), seed=7)
    base16, experts16 = base.bfloat16(), [e.bfloat16() for e in experts]
    params = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    low = run("della", base16, experts16, params, seed=5).tensor
    high = run("della", base16.float(), [e.float() for e in experts16], params, seed=5).tensor
    assert low.dtype == torch.float32 and torch.equal(low, high)


# ----------------------------------------------------------------------------- slerp, nuslerp


def ref_slerp(t, v0, v1):
    a, b = np.asarray(v0, dtype=np.float64).ravel(), np.asarray(v1, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    cos = np.clip(np.dot(a / na, b / nb), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_slerp_matches_reference(chunking):
    base, (other,) = case(1, (12, 7), seed=11, scale=1.0)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0, 1.3):
        got = run("slerp", base, [other], [{}], {"t": t}).tensor
        np.testing.assert_allclose(np_(got).ravel(), ref_slerp(t, np_(base), np_(other)), rtol=0, atol=1e-12)
    assert torch.equal(run("slerp", base, [other], [{}], {"t": 0.0}).tensor, base)  # t = 0: the base, exactly
    assert torch.equal(run("slerp", base, [other], [{}], {"t": 1.0}).tensor, other)


def test_slerp_near_parallel_falls_back_to_lerp():
    base = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    near = base * 2 + 1e-3 * torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = run("slerp", base, [near], [{}], {"t": 0.3}).tensor
    np.testing.assert_allclose(got.numpy(), (0.7 * base + 0.3 * near).numpy(), rtol=0, atol=1e-14)
    opposite = run("slerp", base, [-base], [{}], {"t": 0.25}).tensor  # antiparallel: lerp too
    np.testing.assert_allclose(opposite.numpy(), (0.5 * base).numpy(), atol=1e-14)
    zero = run("slerp", torch.zeros(5), [torch.ones(5)], [{}], {"t": 0.5}).tensor  # a zero norm counts as 1
    np.testing.assert_allclose(zero.numpy(), np.full(5, math.sin(math.pi / 4)), atol=1e-6)


def test_slerp_needs_t_and_exactly_one_other():
    base, experts = case(2)
    with pytest.raises(RecipeError, match="'t' is required"):
        get_method("slerp").merge(TensorTask("t", base, experts[:1], [{}], {}))
    with pytest.raises(MergeError, match="exactly one other"):
        run("slerp", base, experts, [{}, {}], {"t": 0.5})


def ref_nuslerp(t, v0, v1, *, base=None, flatten=True, row_wise=False):
    a, b = np.asarray(v0, dtype=np.float64), np.asarray(v1, dtype=np.float64)
    if base is not None:
        a, b = a - base, b - base
    shape = a.shape
    if flatten or a.ndim <= 1:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.reshape(shape[0], -1).T, b.reshape(shape[0], -1).T
    else:
        a, b = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    out = np.empty_like(a)
    for r in range(a.shape[0]):
        x, y = a[r], b[r]
        cos = np.clip(np.dot(x / max(np.linalg.norm(x), 1e-7), y / max(np.linalg.norm(y), 1e-7)), -1, 1)
        if 1 - cos**2 <= 1e-16:
            out[r] = (1 - t) * x + t * y
        else:
            omega = np.arccos(cos)
            out[r] = (np.sin((1 - t) * omega) * x + np.sin(t * omega) * y) / np.sin(omega)
    if not flatten and row_wise and len(shape) > 1:
        out = out.T
    out = out.reshape(shape)
    return out + base if base is not None else out


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_reference(chunking, flatten, row_wise):
    base, experts = case(2, (9, 6), seed=12)
    g = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    params = [{"weight": 0.3}, {"weight": 0.9}]
    with_base = run("nuslerp", base, experts, params, g).tensor
    without = run("nuslerp", None, experts, params, g).tensor
    a, b = np_(experts[0]), np_(experts[1])
    np.testing.assert_allclose(np_(with_base), ref_nuslerp(0.75, a, b, base=np_(base), flatten=flatten, row_wise=row_wise), atol=1e-12)
    np.testing.assert_allclose(np_(without), ref_nuslerp(0.75, a, b, flatten=flatten, row_wise=row_wise), atol=1e-12)
    # weights summing to ~0 give t = ½; parallel rows interpolate linearly
    half = run("nuslerp", None, experts, [{"weight": 1.0}, {"weight": -1.0}], g).tensor
    np.testing.assert_allclose(np_(half), ref_nuslerp(0.5, a, b, flatten=flatten, row_wise=row_wise), atol=1e-12)
    parallel = run("nuslerp", None, [experts[0], 3 * experts[0]], params, g).tensor
    np.testing.assert_allclose(np_(parallel), 0.25 * a + 0.75 * 3 * a, atol=1e-12)


# ----------------------------------------------------------------------------- multislerp


def ref_multislerp(tensors, weights, *, base=None, normalize_weights=True, eps=1e-8):
    x = np.stack([np.asarray(t, dtype=np.float64).ravel() for t in tensors])
    if base is not None:
        x = x - np.asarray(base, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    units = x / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(0)
    if np.linalg.norm(mean) < eps:
        result = w[0] * x[0] + w[1] * x[1]
    else:
        mean /= np.linalg.norm(mean)
        tangents = units - (units @ mean)[:, None] * mean
        tangent = (w[:, None] * tangents).sum(0)
        size = np.linalg.norm(tangent) + eps
        result = (mean * np.cos(size) + tangent * np.sin(size) / size) * (norms * w).sum()
    if base is not None:
        result = result + np.asarray(base, dtype=np.float64).ravel()
    return result.reshape(np.shape(tensors[0]))


def test_multislerp_matches_reference(chunking):
    base, experts = case(4, (5, 8), seed=13)
    weights = [0.5, 1.0, 0.25, 2.0]
    params = [{"weight": w} for w in weights]
    got = run("multislerp", None, experts, params).tensor
    np.testing.assert_allclose(np_(got), ref_multislerp([np_(e) for e in experts], weights), atol=1e-12)
    on_tasks = run("multislerp", base, experts[:3], params[:3], {"normalize_weights": False}).tensor
    expected = ref_multislerp([np_(e) for e in experts[:3]], weights[:3], base=np_(base), normalize_weights=False)
    np.testing.assert_allclose(np_(on_tasks), expected, atol=1e-12)


def test_multislerp_antipodal_inputs():
    a = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    two = run("multislerp", None, [a, -a], [{"weight": 1.0}, {"weight": 1.0}]).tensor  # falls back to linear
    np.testing.assert_allclose(two.numpy(), np.zeros(30), atol=1e-15)
    with pytest.raises(MergeError, match="weighted sum of the models' directions is zero"):
        run("multislerp", None, [a, -a, a, -a], [{"weight": 1.0}] * 4)


# ----------------------------------------------------------------------------- karcher


def ref_karcher(tensors, weights, max_iter=10, tol=1e-5):
    x = [np.asarray(t, dtype=np.float64).ravel() for t in tensors]
    alphas = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    norms = [np.linalg.norm(v) for v in x]
    valid = [i for i in range(len(x)) if norms[i] > tol]
    share = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    units = {i: x[i] / norms[i] for i in valid}
    mean = sum(share[i] * units[i] for i in valid)
    mean = units[valid[0]] if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            cos = np.clip(np.dot(mean, units[i]), -1, 1)
            theta = np.arccos(cos)
            if theta < tol:
                continue
            tangent += share[i] * theta / np.sin(theta) * (units[i] - cos * mean)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        mean = np.cos(size) * mean + np.sin(size) * tangent / size
        mean /= np.linalg.norm(mean)
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).reshape(np.shape(tensors[0]))


def test_karcher_matches_reference(chunking):
    _, experts = case(4, (6, 7), seed=14, scale=1.0)
    for weights in ([1.0] * 4, [0.5, 2.0, 1.0, 0.1]):
        got = run("karcher", None, experts, [{"weight": w} for w in weights]).tensor
        np.testing.assert_allclose(np_(got), ref_karcher([np_(e) for e in experts], weights), atol=1e-12)
    few = run("karcher", None, experts, [{}] * 4, {"max_iter": 1}).tensor
    np.testing.assert_allclose(np_(few), ref_karcher([np_(e) for e in experts], [1.0] * 4, max_iter=1), atol=1e-12)


def test_karcher_equal_inputs_and_weights():
    a = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(run("karcher", None, [a, a, a], [{}] * 3).tensor.numpy(), a.numpy(), atol=1e-14)
    b = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # all the weight on one model gives that model; the weights move the mean
    np.testing.assert_allclose(run("karcher", None, [a, b], [{"weight": 1.0}, {"weight": 0.0}]).tensor.numpy(), a.numpy(), atol=1e-12)
    light = run("karcher", None, [a, b], [{"weight": 1.0}, {"weight": 0.2}]).tensor
    equal = run("karcher", None, [a, b], [{}, {}]).tensor
    assert torch.dist(light / light.norm(), a / a.norm()) < torch.dist(equal / equal.norm(), a / a.norm())
    zero = run("karcher", None, [torch.zeros(5), torch.zeros(5)], [{}, {}]).tensor
    assert torch.equal(zero, torch.zeros(5))
    with pytest.raises(RecipeError, match="non-negative with a positive sum"):
        run("karcher", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}])


# ----------------------------------------------------------------------------- model_stock


def ref_model_stock(base, experts, filter_wise=False):
    b = np.asarray(base, dtype=np.float64)
    shape = b.shape
    rows = b.reshape(-1, shape[-1]) if filter_wise and b.ndim > 1 else b.reshape(1, -1)
    ws = [np.asarray(e, dtype=np.float64).reshape(rows.shape) for e in experts]
    n = len(ws)
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        taus = [w[r] - rows[r] for w in ws]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                denom = max(np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]), 1e-6)
                cos.append(np.clip(np.dot(taus[i], taus[j]) / denom, -1, 1))
        c = np.mean(cos)
        d = 1 + (n - 1) * c
        t = 0.0 if abs(d) < 1e-6 else n * c / d
        out[r] = t * sum(w[r] for w in ws) / n + (1 - t) * rows[r]
    return out.reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(chunking, filter_wise):
    base, experts = case(4, (7, 9), seed=15)
    experts = [experts[0] + 0.2 * (e - base) for e in experts]  # correlated task vectors
    for count in (2, 4):
        got = run("model_stock", base, experts[:count], [{}] * count, {"filter_wise": filter_wise}).tensor
        expected = ref_model_stock(np_(base), [np_(e) for e in experts[:count]], filter_wise)
        np.testing.assert_allclose(np_(got), expected, atol=1e-12)
    one_d = run("model_stock", base[0], [e[0] for e in experts], [{}] * 4, {"filter_wise": filter_wise}).tensor
    np.testing.assert_allclose(np_(one_d), ref_model_stock(np_(base[0]), [np_(e[0]) for e in experts]), atol=1e-12)


def test_model_stock_identical_and_opposed_experts():
    base, (expert,) = case(1, (4, 5), seed=16)
    same = run("model_stock", base, [expert, expert.clone(), expert.clone()], [{}] * 3).tensor
    np.testing.assert_allclose(same.numpy(), expert.numpy(), atol=1e-12)  # cos 1: t = 1
    opposed = run("model_stock", base, [expert, 2 * base - expert], [{}] * 2).tensor
    np.testing.assert_array_equal(opposed.numpy(), base.numpy())  # 1 + (N−1)cos = 0: the base
    with pytest.raises(MergeError, match="at least two"):
        run("model_stock", base, [expert], [{}])


# ----------------------------------------------------------------------------- sce


def ref_sce(base, experts, select_topk):
    b = np.asarray(base, dtype=np.float64).ravel()
    taus = np.stack([np.asarray(e, dtype=np.float64).ravel() - b for e in experts])
    n_models, n = taus.shape
    if select_topk <= 0:
        taus[:] = 0
    elif select_topk < 1:
        var = taus.var(axis=0)
        k = int(int(np.count_nonzero(var)) * select_topk)
        keep = set(sorted(range(n), key=lambda j: (-var[j], j))[:k])
        taus[:, [j for j in range(n) if j not in keep]] = 0
    omega = (taus**2).mean(axis=1)
    omega = np.full(n_models, 1 / n_models) if abs(omega.sum()) < 1e-6 else omega / omega.sum()
    out = np.empty(n)
    for j in range(n):
        gamma = 1.0 if taus[:, j].sum() >= 0 else -1.0
        agree = np.sign(taus[:, j]) == gamma
        num = sum(omega[i] * taus[i, j] for i in range(n_models) if agree[i])
        den = max(sum(omega[i] for i in range(n_models) if agree[i]), 1e-6)
        out[j] = b[j] + num / den
    return out.reshape(np.shape(base))


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_reference(chunking, select_topk):
    # four experts with quantised task vectors: exact variances, so ties are real ties
    # (broken by position); three with continuous ones
    for count, quantise in ((4, True), (3, False)):
        base, experts = case(count, (6, 10), seed=17, scale=1.0, quantise=quantise)
        got = run("sce", base, experts, [{}] * count, {"select_topk": select_topk}).tensor
        np.testing.assert_allclose(np_(got), ref_sce(np_(base), [np_(e) for e in experts], select_topk), atol=1e-12)


def test_sce_single_expert_and_tiny_task_vectors():
    base, experts = case(2, (5, 5), seed=18, scale=1e-5)  # Σ ω < 1e-6: equal weights
    got = run("sce", base, experts, [{}] * 2, {"select_topk": 0.5}).tensor
    np.testing.assert_allclose(np_(got), ref_sce(np_(base), [np_(e) for e in experts], 0.5), atol=1e-15)
    one = run("sce", base, experts[:1], [{}], {"select_topk": 0.5}).tensor  # no variance: nothing selected
    assert torch.equal(one, base)


# ----------------------------------------------------------------------------- passthrough


def test_passthrough():
    x = torch.randn(3, 4).bfloat16()
    plain = run("passthrough", None, [x], [{}]).tensor
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, x)  # as stored: a float32 copy would be cast back
    scaled = run("passthrough", None, [x], [{"scale": 0.3}]).tensor
    assert scaled.dtype == torch.float32 and torch.equal(scaled.bfloat16(), x * 0.3)  # one rounding, as mergekit
    with pytest.raises(MergeError, match="exactly one model"):
        run("passthrough", None, [x, x], [{}, {}])


# ----------------------------------------------------------------------------- all of them


DETERMINISTIC = {
    "breadcrumbs": ({"density": 0.4}, {}),
    "breadcrumbs_ties": ({"density": 0.4, "gamma": 0.05}, {}),
    "multislerp": ({}, {}),
    "karcher": ({}, {}),
    "model_stock": ({}, {"filter_wise": True}),
    "sce": ({}, {"select_topk": 0.3}),
    "nuslerp": ({}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "slerp": ({}, {"t": 0.4}),
}


def _inputs_for(name, base, experts):
    if name == "slerp":
        return base, experts[:1]
    if name == "nuslerp":
        return base, experts[:2]
    if name in ("multislerp", "karcher"):
        return None, experts
    return base, experts


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_bfloat16_float64_and_thread_count(name):
    """bf16 inputs give float32 equal to their float32 upcast; float64 stays float64; the
    bytes do not depend on the thread count (shards may run with fewer threads)."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(300, 520, generator=g)
    experts = [base + 0.1 * torch.randn(300, 520, generator=g) for _ in range(3)]
    per_model, shared = DETERMINISTIC[name]
    b16, e16 = _inputs_for(name, base.bfloat16(), [e.bfloat16() for e in experts])
    b32, e32 = _inputs_for(name, base.bfloat16().float(), [e.bfloat16().float() for e in experts])
    params = [{"weight": 0.5 + i, **per_model} for i in range(len(e16))]
    low = run(name, b16, e16, params, shared).tensor
    assert low.dtype == torch.float32 and low.shape == base.shape
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(name, b32, e32, params, shared).tensor
    finally:
        torch.set_num_threads(before)
    assert low.numpy().tobytes() == one.numpy().tobytes()
    b64, e64 = _inputs_for(name, base.double(), [e.double() for e in experts])
    assert run(name, b64, e64, params, shared).tensor.dtype == torch.float64


# ----------------------------------------------------------------------------- through the engine


def _read(output) -> dict[str, bytes]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(output.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).numpy().tobytes()
    return tensors


def test_della_is_identical_across_shard_counts(family, tmp_path):
    from orchestrator.pipeline import merge
    from orchestrator.recipe import parse_recipe
    from tests.helpers import gta_recipe

    base, experts = family
    recipe = parse_recipe(gta_recipe("della", base, experts))
    merge(recipe, str(tmp_path / "one"), shards=1, workers=1)
    merge(recipe, str(tmp_path / "three"), shards=3, workers=1)
    one, three = _read(tmp_path / "one"), _read(tmp_path / "three")
    assert one.keys() == three.keys() and all(one[name] == three[name] for name in one)


def test_della_mask_bits_pack_like_numpy():
    mask = (torch.rand(1003, generator=torch.Generator().manual_seed(0)) < 0.4).to(torch.uint8)
    out = torch.empty(126, dtype=torch.uint8)
    rank_sparsify.pack_bits(mask, out)
    np.testing.assert_array_equal(out.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    keep = rank_sparsify.RankKeep(1003, int(mask.sum()), out)
    x = torch.randn(1003)
    for start, stop in ((0, 1003), (5, 17), (8, 16), (999, 1003)):
        chunk = x[start:stop].clone()
        keep.apply_(chunk, start)
        assert torch.equal(chunk, x[start:stop] * mask[start:stop])


def test_della_bounds_fail_at_plan_time_naming_tensor_and_model(family, tmp_path):
    from orchestrator.plan import build_plan
    from orchestrator.recipe import parse_recipe
    from tests.helpers import gta_recipe

    base, experts = family
    recipe = gta_recipe("della", base, experts)
    recipe["models"][2]["parameters"]["epsilon"] = [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]
    pattern = rf"della, tensor 'model\.layers\.0\.mlp\.\w+\.weight', model {re.escape(str(experts[1]))}: della needs"
    with pytest.raises(RecipeError, match=pattern):
        build_plan(parse_recipe(recipe), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    breadcrumbs = gta_recipe("breadcrumbs", base, experts)
    breadcrumbs["models"][1]["parameters"]["gamma"] = 2.0
    with pytest.raises(RecipeError, match=rf"breadcrumbs, tensor '[\w.]+', model {re.escape(str(experts[0]))}: parameter 'gamma'"):
        build_plan(parse_recipe(breadcrumbs), str(tmp_path / "out"))
