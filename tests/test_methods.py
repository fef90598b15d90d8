"""Merge methods against naive float64 references (tests/references.py) written from docs/methods.md.

The references loop over positions in numpy; the methods under test are the fused,
chunked torch code. Every reference test runs twice: with the real chunk size and
with a tiny one, so the multi-chunk paths (tie cuts across chunk edges, per-chunk
buffers, the last short chunk) are exercised on small tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.errors import RecipeError
from orchestrator.methods import METHODS, MODULE_OF, get_method, sparsify
from orchestrator.methods.base import MergeResult, TensorTask, tensor_seed
from orchestrator.methods.linear import linear_merge
from tests.references import ref_family, ref_magnitude

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(params=["real-chunks", "tiny-chunks"])
def chunking(request, monkeypatch):
    if request.param == "tiny-chunks":
        monkeypatch.setattr(sparsify, "CHUNK", 7)
    return request.param


def run(name, base, experts, model_params, global_params=None, *, tensor="t", seed=0) -> MergeResult:
    task = TensorTask(tensor, base, experts, model_params, global_params or {}, seed=seed)
    return get_method(name).merge(task)


def defaults(name: str) -> dict:
    return {p.name: p.default for p in get_method(name).global_params}


def models(weights, **per_model):
    return [{"weight": w, **{k: v[i] for k, v in per_model.items()}} for i, w in enumerate(weights)]


def random_case(n_experts=3, n=60, seed=0, quantise=False):
    """A base and experts; with ``quantise`` the task vectors take few values (many ties)."""
    g = np.random.default_rng(seed)
    base = g.normal(size=n)
    taus = [g.normal(size=n) for _ in range(n_experts)]
    if quantise:
        taus = [np.round(t * 2) / 2 for t in taus]
    return torch.tensor(base), [torch.tensor(base + t) for t in taus]


# ----------------------------------------------------------------------------- registry


def test_registered_methods_are_pinned():
    assert sorted(METHODS) == [
        "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dam_apply", "dare_linear", "dare_ties", "della", "della_linear",
        "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl",
        "sce", "slerp", "task_arithmetic", "ties", "ties_sv",
    ]
    assert all(spec.name == name for name, spec in METHODS.items())


def test_every_module_s_specs_are_found_where_get_method_looks():
    import importlib
    import pkgutil

    import orchestrator.methods as package

    registered = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"orchestrator.methods.{info.name}")
        registered.update({spec.name: info.name for spec in getattr(module, "SPECS", ())})
    assert registered == MODULE_OF


@pytest.mark.parametrize("name", ["tis", "nope"])
def test_unknown_method_lists_available_names(name):
    with pytest.raises(RecipeError) as error:
        get_method(name)
    assert str(error.value) == (
        f"unknown merge_method '{name}'; available: arcee_fusion, breadcrumbs, breadcrumbs_ties, dam_apply, "
        "dare_linear, dare_ties, della, della_linear, karcher, linear, model_stock, multislerp, nearswap, nuslerp, passthrough, "
        "ram, ramplus_tl, sce, slerp, task_arithmetic, ties, ties_sv"
    )


def test_parameter_specs_follow_mergekit():
    expected_normalize = {
        "linear": True,
        "task_arithmetic": False,
        "ties": True,
        "dare_ties": False,
        "dare_linear": False,
        "ties_sv": True,
    }
    for name, normalize in expected_normalize.items():
        spec = get_method(name)
        assert spec.param("normalize").default is normalize
        assert spec.param("weight").required
        assert spec.needs_base is (name != "linear")
        assert spec.sparsifies is (name in ("ties", "dare_ties", "dare_linear", "ties_sv"))
        assert spec.uses_randomness is name.startswith("dare")
        assert (spec.param("density") is not None) is spec.sparsifies
        assert (spec.param("protect") is not None) is (name in ("ties", "ties_sv"))
        if spec.needs_base:
            assert spec.param("lambda").default == 1.0
            assert spec.param("int8_mask").default is False
    assert get_method("dare_ties").param("rescale").default is True
    assert get_method("dare_linear").param("rescale").default is True
    assert get_method("ties").param("rescale").default is False
    assert get_method("ties_sv").param("slack").default == 0.1
    assert get_method("ties").param("slack") is None


# ----------------------------------------------------------------------------- magnitude


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.99, 1.0, 1.5, -0.2])
def test_magnitude_matches_reference(chunking, density):
    tau = np.random.default_rng(1).normal(size=53)
    tau[::5] = 0.75  # a block of equal magnitudes, some of each sign
    tau[1::9] = -0.75
    got = sparsify.magnitude(torch.tensor(tau), density)
    np.testing.assert_array_equal(got.numpy(), ref_magnitude(tau, density))


def test_magnitude_threshold_ties_keep_lowest_index(chunking):
    tau = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 0.5, 1.0])
    got = sparsify.magnitude(tau, 0.5)  # k = 4 among seven entries of magnitude 1
    assert got.tolist() == [1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert sparsify.magnitude(torch.zeros(10), 0.3).tolist() == [0.0] * 10
    assert sparsify.magnitude(torch.tensor([3.0]), 0.01).tolist() == [3.0]  # k is at least 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_exact_on_many_ties_across_chunks(dtype):
    """bf16-like task vectors: few distinct values, so the threshold is shared by many
    entries and the cut falls inside a chunk; compared with a stable sort."""
    g = torch.Generator().manual_seed(3)
    n = 3 * sparsify.CHUNK + 1234
    tau = (torch.randn(n, generator=g) * 8).round().to(dtype) / 8
    for density in (0.013, 0.2, 0.77):
        k = sparsify.kept_count(n, density)
        order = torch.sort(tau.abs(), descending=True, stable=True).indices[:k]
        expected = torch.zeros_like(tau)
        expected[order] = tau[order]
        assert torch.equal(sparsify.magnitude(tau, density), expected)


def test_magnitude_matches_mergekit_on_continuous_data():
    mergekit_sparsify = pytest.importorskip("mergekit.sparsify")
    tau = torch.randn(4099, generator=torch.Generator().manual_seed(5))
    for density in (0.1, 0.5, 0.9):
        assert torch.equal(sparsify.magnitude(tau, density), mergekit_sparsify.magnitude(tau, density))


def test_magnitude_l1_rescale():
    tau = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = sparsify.magnitude(tau, 0.3, rescale="l1")
    assert torch.count_nonzero(got) == 300
    assert abs(float(got.abs().sum()) / float(tau.abs().sum()) - 1) < 1e-12


# ----------------------------------------------------------------------------- task arithmetic, ties


def test_task_arithmetic_matches_reference(chunking):
    base, experts = random_case(3, 41)
    weights = [0.5, -0.25, 1.5]
    for normalize in (False, True):
        for lam in (1.0, 0.7):
            result = run("task_arithmetic", base, experts, models(weights), {"normalize": normalize, "lambda": lam})
            expected, _ = ref_family(base, experts, weights, normalize=normalize, lam=lam)
            np.testing.assert_allclose(result.tensor.numpy(), expected, rtol=0, atol=1e-12)
            assert result.report == {}


def test_task_arithmetic_weights_summing_to_zero_are_not_divided():
    base, experts = random_case(2, 20)
    result = run("task_arithmetic", base, experts, models([1.0, -1.0]), {"normalize": True})
    expected, _ = ref_family(base, experts, [1.0, -1.0], normalize=True)  # divisor 0 → 1
    np.testing.assert_allclose(result.tensor.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(result.tensor.numpy(), (experts[0] - experts[1] + base).numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "quantise, weights",
    [(False, [1.0, 0.5, 2.0, 0.75]), (True, [1.0, 0.5, 2.0, 0.75]), (True, [1.0, -1.0, 0.0, 0.5])],
)
def test_ties_matches_reference(chunking, quantise, weights):
    """Negative and zero weights too: agreeing weights may then sum to 0 (divisor → 1)."""
    base, experts = random_case(4, 57, seed=7, quantise=quantise)
    densities = [0.3, 0.5, 1.0, 0.1]
    result = run("ties", base, experts, models(weights, density=densities), defaults("ties"))
    sparse = [ref_magnitude((e - base).numpy(), d) for e, d in zip(experts, densities)]
    expected, report = ref_family(
        base, experts, weights, sparsified=sparse, consensus=True, normalize=True,
        report=range(4), densities=densities,
    )
    np.testing.assert_allclose(result.tensor.numpy(), expected, rtol=0, atol=1e-12)
    assert result.report == report
    assert result.tensor.dtype == torch.float64 and result.tensor.shape == base.shape


def test_ties_report_counts_only_protected_models():
    base, experts = random_case(3, 80, seed=11, quantise=True)
    params = models([1.0, 1.0, 1.0], density=[0.4, 0.4, 0.4], protect=[False, True, False])
    result = run("ties", base, experts, params, defaults("ties"))
    sparse = [ref_magnitude((e - base).numpy(), 0.4) for e in experts]
    _, report = ref_family(
        base, experts, [1.0] * 3, sparsified=sparse, consensus=True, report=[1], densities=[0.4] * 3
    )
    assert result.report == report
    assert report["protected_dropped"][0] > 0  # the case does exercise the count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_report_in_half_precision_counts_the_kept_entries_against_the_elected_sign(dtype):
    """The half-precision pass counts drops on bit patterns; here the count is made directly:
    a kept entry of the protected model whose sign differs from the elected one (a −0 sum
    elects −, as ``copysign``), on task vectors with many zeros and ties."""
    from orchestrator.methods.task_arithmetic_half import generalized_merge_half

    g = torch.Generator().manual_seed(21)
    base = torch.randn(4000, generator=g).to(dtype)
    experts = [(base.float() + (torch.randn(4000, generator=g) * 2).round() / 64).to(dtype) for _ in range(3)]
    densities = [0.5, 0.3, 0.7]
    result = generalized_merge_half(base, experts, [1.0] * 3, dtype=dtype, densities=densities, sparsifier="magnitude",
                                    consensus=True, normalize=True, report=[0, 2])
    taus = [(e - base).float() for e in experts]  # rd(θᵢ − θ₀), widened
    kept = []
    for tau, density in zip(taus, densities):
        mask = torch.zeros(tau.numel(), dtype=torch.bool)
        mask[torch.argsort(tau.abs(), descending=True)[: int(density * tau.numel())]] = True
        kept.append(tau * mask)
    elected = torch.copysign(torch.ones(4000), kept[0] + kept[1] + kept[2])
    expected = [int(((kept[p] * elected) < 0).sum()) for p in (0, 2)]
    assert result.report["protected_dropped"] == expected and min(expected) > 0


def test_ties_sign_tie_elects_plus():
    base = torch.zeros(3, dtype=torch.float64)
    experts = [torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64), torch.tensor([-2.0, 2.0, 0.0], dtype=torch.float64)]
    result = run("ties", base, experts, models([1.0, 1.0], density=[1.0, 1.0]), defaults("ties"))
    # the sums are exactly 0, so + is elected: the positive entry survives alone
    assert result.tensor.tolist() == [2.0, 2.0, 0.0]
    assert result.report == {"protected_topk": [3, 3], "protected_dropped": [1, 1]}


def test_ties_edge_cases():
    base, experts = random_case(2, 30, seed=4)
    b = base.numpy()
    # density 0: nothing survives
    zero = run("ties", base, experts, models([1.0, 1.0], density=[0.0, 0.0]), defaults("ties"))
    np.testing.assert_array_equal(zero.tensor.numpy(), b)
    assert zero.report == {"protected_topk": [0, 0], "protected_dropped": [0, 0]}
    # all-zero task vectors
    same = run("ties", base, [base.clone(), base.clone()], models([1.0, 2.0], density=[0.5, 0.5]), defaults("ties"))
    np.testing.assert_array_equal(same.tensor.numpy(), b)
    # one expert: ties reduces to its sparsified task vector
    one = run("ties", base, experts[:1], models([3.0], density=[0.5]), defaults("ties"))
    tau = (experts[0] - base).numpy()
    np.testing.assert_allclose(one.tensor.numpy(), b + ref_magnitude(tau, 0.5), atol=1e-12)
    # no experts: the base
    assert torch.equal(run("ties", base, [], []).tensor, base)


def test_ties_lambda_after_normalisation_and_int8_mask_ignored():
    base, experts = random_case(3, 25, seed=9)
    params = models([1.0, 2.0, 3.0], density=[0.6, 0.6, 0.6])
    plain = run("ties", base, experts, params, {**defaults("ties"), "lambda": 0.5})
    masked = run("ties", base, experts, params, {**defaults("ties"), "lambda": 0.5, "int8_mask": True})
    sparse = [ref_magnitude((e - base).numpy(), 0.6) for e in experts]
    expected, _ = ref_family(base, experts, [1.0, 2.0, 3.0], sparsified=sparse, consensus=True, normalize=True, lam=0.5)
    np.testing.assert_allclose(plain.tensor.numpy(), expected, atol=1e-12)
    assert torch.equal(plain.tensor, masked.tensor)


def test_ties_with_l1_rescale_matches_reference():
    base, experts = random_case(2, 40, seed=12)
    params = models([1.0, 1.0], density=[0.25, 0.5])
    result = run("ties", base, experts, params, {**defaults("ties"), "rescale": True})
    sparse = []
    for e, d in zip(experts, [0.25, 0.5]):
        tau = (e - base).numpy()
        kept = ref_magnitude(tau, d)
        sparse.append(kept * np.abs(tau).sum() / np.abs(kept).sum())
    expected, _ = ref_family(base, experts, [1.0, 1.0], sparsified=sparse, consensus=True, normalize=True)
    np.testing.assert_allclose(result.tensor.numpy(), expected, atol=1e-12)


def test_float32_and_bfloat16_inputs_compute_in_float32():
    base, experts = random_case(3, 50, seed=13)
    base16, experts16 = base.bfloat16(), [e.bfloat16() for e in experts]
    params = models([1.0, 1.0, 1.0], density=[0.5, 0.5, 0.5])
    from_bf16 = run("ties", base16, experts16, params, defaults("ties"))
    from_f32 = run("ties", base16.float(), [e.float() for e in experts16], params, defaults("ties"))
    assert from_bf16.tensor.dtype == torch.float32
    assert torch.equal(from_bf16.tensor, from_f32.tensor)
    sparse = [ref_magnitude((e.double() - base16.double()).numpy(), 0.5) for e in experts16]
    expected, _ = ref_family(base16.double(), [e.double() for e in experts16], [1.0] * 3, sparsified=sparse,
                             consensus=True, normalize=True)
    np.testing.assert_allclose(from_bf16.tensor.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_matrix_shapes_are_kept():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    experts = [base + torch.randn(6, 5, generator=g) for _ in range(2)]
    for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "ties_sv"):
        params = models([1.0, 1.0], density=[0.5, 0.5]) if get_method(name).sparsifies else models([1.0, 1.0])
        assert run(name, base, experts, params, defaults(name)).tensor.shape == (6, 5)
    assert run("linear", None, experts, models([1.0, 1.0])).tensor.shape == (6, 5)


# ----------------------------------------------------------------------------- ties_sv


def test_ties_sv_with_zero_slack_is_ties(chunking):
    base, experts = random_case(3, 64, seed=21, quantise=True)
    params = models([1.0, 0.5, 1.0], density=[0.3, 0.6, 0.2], protect=[True, False, False])
    ties = run("ties", base, experts, params, defaults("ties"))
    sv = run("ties_sv", base, experts, params, {**defaults("ties_sv"), "slack": 0.0})
    assert torch.equal(ties.tensor, sv.tensor)
    assert ties.report == sv.report


def test_ties_sv_rescues_a_protected_entry():
    base = torch.zeros(4, dtype=torch.float64)
    protected = torch.tensor([10.0, 1.0, 0.5, 0.25], dtype=torch.float64)  # its top entry is position 0
    other = torch.tensor([-30.0, 2.0, 0.5, 0.25], dtype=torch.float64)
    params = models([1.0, 1.0], density=[1.0, 1.0], protect=[True, False])
    ties = run("ties", base, [protected, other], params, defaults("ties"))
    sv = run("ties_sv", base, [protected, other], params, {**defaults("ties_sv"), "slack": 0.25})
    assert ties.tensor[0] == -30.0  # plain ties: the sum is −20, so −30 wins alone
    assert sv.tensor.tolist() == [10.0, 1.5, 0.5, 0.25]  # position 0 rescued, the rest as ties
    assert ties.report == {"protected_topk": [4], "protected_dropped": [1]}
    assert sv.report == {"protected_topk": [4], "protected_dropped": [0]}


def test_ties_sv_rescued_mean_of_several_protected_models():
    base = torch.zeros(2, dtype=torch.float64)
    a = torch.tensor([4.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    c = torch.tensor([-20.0, 1.0], dtype=torch.float64)
    params = models([1.0, 3.0, 1.0], density=[1.0, 1.0, 1.0], protect=[True, True, False])
    sv = run("ties_sv", base, [a, b, c], params, {**defaults("ties_sv"), "slack": 0.5})
    assert sv.tensor.tolist() == [(4.0 + 3.0) / 4.0, 1.0]
    unnormalised = run("ties_sv", base, [a, b, c], params, {**defaults("ties_sv"), "slack": 0.5, "normalize": False})
    assert unnormalised.tensor.tolist() == [7.0, 1.0]


@pytest.mark.parametrize("slack", [0.05, 0.2, 0.5, 1.0])
def test_ties_sv_matches_reference(chunking, slack):
    base, experts = random_case(4, 48, seed=31, quantise=True)
    weights, densities = [1.0, 2.0, 0.5, 1.0], [0.5, 0.3, 0.7, 0.25]
    protect = [True, False, True, False]
    params = models(weights, density=densities, protect=protect)
    result = run("ties_sv", base, experts, params, {**defaults("ties_sv"), "slack": slack})
    sparse = [ref_magnitude((e - base).numpy(), d) for e, d in zip(experts, densities)]
    expected, report = ref_family(
        base, experts, weights, sparsified=sparse, consensus=True, normalize=True,
        protected=[0, 2], slack=slack, densities=densities, report=[0, 2],
    )
    np.testing.assert_allclose(result.tensor.numpy(), expected, rtol=0, atol=1e-12)
    assert result.report == report


def test_ties_sv_without_protected_models_is_ties():
    """Only models marked ``protect: true`` are rescued; with none marked the drop rate of
    every model is reported, as for ties."""
    base, experts = random_case(3, 40, seed=22, quantise=True)
    params = models([1.0, 1.0, 1.0], density=[0.5, 0.5, 0.5])
    ties = run("ties", base, experts, params, defaults("ties"))
    sv = run("ties_sv", base, experts, params, {**defaults("ties_sv"), "slack": 0.5})
    assert torch.equal(ties.tensor, sv.tensor)
    assert ties.report == sv.report and len(sv.report["protected_dropped"]) == 3


def test_ties_sv_rejects_slack_outside_unit_interval():
    base, experts = random_case(2, 10)
    for slack in (-0.1, 1.5):
        with pytest.raises(RecipeError, match="slack"):
            run("ties_sv", base, experts, models([1.0, 1.0], density=[0.5, 0.5]), {**defaults("ties_sv"), "slack": slack})


# ----------------------------------------------------------------------------- DARE


def masks_for(seed: int, n: int, densities) -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    return [sparsify.random_keep(n, d, generator).mask.numpy() for d in densities]


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare_matches_reference_given_its_masks(chunking, name):
    base, experts = random_case(3, 70, seed=41)
    weights, densities = [1.0, 0.5, 2.0], [0.5, 0.3, 0.8]
    seed = tensor_seed(7, "model.layers.0.mlp.up_proj.weight")
    result = run(name, base, experts, models(weights, density=densities), defaults(name), seed=seed)
    sparse = []
    for tau, mask in zip([(e - base).numpy() for e in experts], masks_for(seed, 70, densities)):
        kept = tau * mask
        sparse.append(kept * np.abs(tau).sum() / np.abs(kept).sum())
    expected, _ = ref_family(base, experts, weights, sparsified=sparse, consensus=name == "dare_ties")
    np.testing.assert_allclose(result.tensor.numpy(), expected, rtol=0, atol=1e-12)


def test_dare_kept_fraction_is_density():
    n = 1 << 20
    for density in (0.1, 0.5, 0.9):
        keep = sparsify.random_keep(n, density, torch.Generator().manual_seed(1))
        fraction = keep.kept / n
        assert abs(fraction - density) < 3 * np.sqrt(density * (1 - density) / n)
        assert keep.kept == int(keep.mask.sum())


def test_dare_draws_are_torch_rand_in_order():
    """The definition, pinned: u ~ torch.rand on a CPU generator, one expert after the other."""
    generator = torch.Generator().manual_seed(123)
    first = sparsify.random_keep(1000, 0.3, generator)
    second = sparsify.random_keep(1000, 0.6, generator)
    reference = torch.Generator().manual_seed(123)
    assert torch.equal(first.mask, torch.rand(1000, generator=reference) < 0.3)
    assert torch.equal(second.mask, torch.rand(1000, generator=reference) < 0.6)


def test_dare_l1_rescale_keeps_the_norm():
    tau = torch.randn(100_000, generator=torch.Generator().manual_seed(8))
    got = sparsify.dare(tau, 0.2, generator=torch.Generator().manual_seed(9))
    assert abs(float(got.abs().double().sum()) / float(tau.abs().double().sum()) - 1) < 1e-5
    zero = torch.zeros(100)
    assert torch.equal(sparsify.dare(zero, 0.5, generator=torch.Generator().manual_seed(9)), zero)  # no rescale
    assert torch.equal(sparsify.dare(tau, 1.0, generator=torch.Generator()), tau)


def test_dare_inverse_rescale_divides_by_density():
    tau = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = sparsify.dare(tau, 0.25, generator=torch.Generator().manual_seed(3), rescale="inverse")
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(3)) < 0.25
    torch.testing.assert_close(got, torch.where(mask, tau / 0.25, 0.0), rtol=1e-15, atol=0)
    none = sparsify.dare(tau, 0.25, generator=torch.Generator().manual_seed(3), rescale=None)
    assert torch.equal(none, torch.where(mask, tau, 0.0))


def test_dare_is_deterministic_per_tensor_name():
    base, experts = random_case(2, 500, seed=5)
    params = models([1.0, 1.0], density=[0.5, 0.5])
    seed_a, seed_b = tensor_seed(0, "model.layers.0.q_proj.weight"), tensor_seed(0, "model.layers.1.q_proj.weight")
    first = run("dare_ties", base, experts, params, defaults("dare_ties"), seed=seed_a)
    again = run("dare_ties", base, experts, params, defaults("dare_ties"), seed=seed_a)
    other = run("dare_ties", base, experts, params, defaults("dare_ties"), seed=seed_b)
    assert first.tensor.numpy().tobytes() == again.tensor.numpy().tobytes()
    assert not torch.equal(first.tensor, other.tensor)
    masks_a, masks_b = masks_for(seed_a, 500, [0.5, 0.5]), masks_for(seed_b, 500, [0.5, 0.5])
    assert not np.array_equal(masks_a[0], masks_b[0])


def test_dare_bfloat16_inputs_equal_their_float32_upcast():
    base, experts = random_case(3, 3000, seed=6)
    base16, experts16 = base.bfloat16(), [e.bfloat16() for e in experts]
    params = models([1.0, 0.5, 0.25], density=[0.3, 0.3, 0.6])
    for name in ("dare_ties", "dare_linear"):
        low = run(name, base16, experts16, params, defaults(name), seed=17)
        high = run(name, base16.float(), [e.float() for e in experts16], params, defaults(name), seed=17)
        assert low.tensor.dtype == torch.float32
        assert torch.equal(low.tensor, high.tensor)


def test_rescale_must_be_bool_or_inverse():
    base, experts = random_case(2, 10)
    with pytest.raises(RecipeError, match="rescale"):
        run("dare_ties", base, experts, models([1.0, 1.0], density=[0.5, 0.5]), {"rescale": "l2"})


# ----------------------------------------------------------------------------- linear


def test_linear_matches_reference(chunking):
    _, tensors = random_case(4, 33, seed=51)
    weights = [0.1, 0.4, 0.2, 0.3]
    arrays = [t.numpy() for t in tensors]
    weighted = sum(w * a for w, a in zip(weights, arrays))
    normalised = run("linear", None, tensors, models(weights), {"normalize": True})
    plain = run("linear", None, tensors, models([2.0, 1.0, 1.0, 1.0]), {"normalize": False})
    np.testing.assert_allclose(normalised.tensor.numpy(), weighted / sum(weights), atol=1e-12)
    np.testing.assert_allclose(plain.tensor.numpy(), 2 * arrays[0] + sum(arrays[1:]), atol=1e-12)
    assert run("linear", None, tensors, models(weights)).tensor.dtype == torch.float64


def test_linear_bfloat16_inputs_and_zero_weight_sum():
    tensors = [torch.randn(100, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3)]
    got = linear_merge(tensors, [1.0, 1.0, 2.0])
    expected = (tensors[0].double() + tensors[1].double() + 2 * tensors[2].double()) / 4
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    # as in mergekit the divisor is used as is: a zero sum gives non-finite values,
    # which the engine refuses with a message naming the tensor
    assert not torch.isfinite(linear_merge(tensors[:2], [1.0, -1.0])).all()


def test_results_do_not_depend_on_the_thread_count():
    """Worker processes may run with fewer threads: sums (L1 rescale) must not change."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(600, 700, generator=g)
    experts = [base + torch.randn(600, 700, generator=g) * torch.rand(1, 700, generator=g) for _ in range(3)]
    params = models([1.0, 0.5, 0.25], density=[0.3, 0.5, 0.7])
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append([
                run(name, base, experts, params, {**defaults(name), "rescale": True}, seed=5).tensor
                for name in ("dare_ties", "dare_linear", "ties")
            ])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*outputs):
        assert one.numpy().tobytes() == two.numpy().tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_inputs_give_the_cpu_result():
    base, experts = random_case(3, 5000, seed=14)
    base, experts = base.float(), [e.float() for e in experts]
    params = models([1.0, 0.5, 0.25], density=[0.3, 0.5, 0.7], protect=[True, False, False])
    for name in ("linear", "task_arithmetic", "ties", "ties_sv", "dare_ties", "dare_linear"):
        cpu_base, gpu_base = (None, None) if name == "linear" else (base, base.cuda())
        on_cpu = run(name, cpu_base, experts, params, defaults(name), seed=3)
        on_gpu = run(name, gpu_base, [e.cuda() for e in experts], params, defaults(name), seed=3)
        assert on_gpu.tensor.device.type == "cuda"
        torch.testing.assert_close(on_gpu.tensor.cpu(), on_cpu.tensor, rtol=1e-6, atol=1e-6)
        assert on_gpu.report == on_cpu.report
