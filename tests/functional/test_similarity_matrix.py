"""similarity_matrix: every layer against every layer, equal to the single-pair functions."""

import warnings

import numpy as np
import pytest
import torch

from lightning_repsim import functional as F
from lightning_repsim.errors import RepSimValueError, RepSimWarning
from tests import reference as R
from tests.helpers import call_recording, randn, to_torch

N = 40

#: measure name -> (single-pair function taking options, symmetric?)
PAIRWISE = {
    "linear_cka": (F.linear_cka, True),
    "debiased_cka": (lambda x, y, **o: F.linear_cka(x, y, debiased=True, **o), True),
    "rbf_cka": (F.rbf_cka, True),
    "rv": (F.rv, True),
    "rv2": (F.rv2, True),
    "svcca": (F.svcca, True),
    "pwcca": (F.pwcca, False),
}

#: (measure, options) pairs, the options passed through to the measure.
CASES = [(m, {}) for m in PAIRWISE] + [
    ("linear_cka", {"debiased": True}),
    ("rbf_cka", {"sigma": 0.5}),
    ("rbf_cka", {"sigma": 0.5, "debiased": True}),
    ("rv", {"center": False}),
    ("rv2", {"center": False}),
    ("svcca", {"keep": 3}),
    ("svcca", {"keep": 0.5}),
]


def _layers(seed=0, widths=(3, 8, 5, 12)):
    """Related layers of different widths over the same N examples (CCA stays determined)."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, 4))
    out = []
    for p in widths:
        h = np.tanh(h @ rng.standard_normal((h.shape[1], p))) + 0.3 * rng.standard_normal((N, p))
        out.append(h)
    return out


def _loop(measure, xs, ys, **options):
    fn, _ = PAIRWISE[measure]
    return np.array([[float(fn(to_torch(a), to_torch(b), **options)) for b in ys] for a in xs])


_LOOPS = {}


def _cached_loop(measure, options):
    """The per-pair loop on the fixed (xs, ys) of test_equals_pair_loop, computed once per case."""
    key = (measure, tuple(sorted(options.items())))
    if key not in _LOOPS:
        _LOOPS[key] = _loop(measure, _layers(0), _layers(1, widths=(6, 2, 9)), **options)
    return _LOOPS[key]


def test_measures_listed():
    assert set(F.MEASURES) == set(PAIRWISE)


# Every route of the engine; the RBF kernel has no feature-space route (see test_errors).
ROUTED = [(m, o, r) for r in ("auto", "features", "gram") for m, o in CASES if (m, r) != ("rbf_cka", "features")]


@pytest.mark.parametrize("measure, options, method", ROUTED, ids=[f"{m}-{o}-{r}" for m, o, r in ROUTED])
def test_equals_pair_loop(measure, options, method):
    xs, ys = _layers(0), _layers(1, widths=(6, 2, 9))
    got = F.similarity_matrix([to_torch(a) for a in xs], [to_torch(b) for b in ys], measure, method=method, **options)
    assert got.shape == (4, 3)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _cached_loop(measure, options), rtol=0, atol=1e-10)


@pytest.mark.parametrize("measure, options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_ys_none_compares_xs_with_itself(measure, options):
    xs = _layers(2)
    got = F.similarity_matrix([to_torch(a) for a in xs], measure=measure, **options).numpy()
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, _loop(measure, xs, xs, **options), rtol=0, atol=1e-10)
    if PAIRWISE[measure][1]:
        np.testing.assert_allclose(got, got.T, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.diag(got), 1.0, rtol=0, atol=1e-9)


def test_pwcca_matrix_is_asymmetric():
    xs = [to_torch(a) for a in _layers(3, widths=(5, 5, 5))]  # equal ranks: weights by the row layer
    got = F.similarity_matrix(xs, measure="pwcca").numpy()
    assert np.abs(got - got.T).max() > 1e-3
    raw = _layers(3, widths=(5, 5, 5))
    np.testing.assert_allclose(got[0, 1], R.pwcca(raw[0], raw[1]), atol=1e-10)
    np.testing.assert_allclose(got[1, 0], R.pwcca(raw[1], raw[0]), atol=1e-10)


def test_debiased_cka_name_equals_option():
    xs = [to_torch(a) for a in _layers(4)]
    a = F.similarity_matrix(xs, measure="debiased_cka")
    b = F.similarity_matrix(xs, measure="linear_cka", debiased=True)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


def test_matches_reference():
    xs, ys = _layers(5), _layers(6, widths=(7, 3))
    got = F.similarity_matrix([to_torch(a) for a in xs], [to_torch(b) for b in ys], "linear_cka").numpy()
    expected = np.array([[R.linear_cka(a, b) for b in ys] for a in xs])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("measure", sorted(PAIRWISE))
def test_dict_input_names_degenerate_layer(measure):
    layers = _layers(7, widths=(4, 6, 5))
    xs = {"conv1": to_torch(layers[0]), "dead_relu": torch.zeros(N, 6, dtype=torch.float64), "fc": to_torch(layers[2])}
    with pytest.warns(RepSimWarning, match="dead_relu"):
        got = F.similarity_matrix(xs, measure=measure).numpy()
    assert np.isnan(got[1, :]).all() and np.isnan(got[:, 1]).all()
    alive = got[np.ix_([0, 2], [0, 2])]
    assert np.isfinite(alive).all()
    ys = {"probe": to_torch(layers[1]), "diverged": to_torch(np.full((N, 3), np.nan))}
    with pytest.warns(RepSimWarning, match="diverged"):
        got = F.similarity_matrix(xs, ys, measure=measure).numpy()
    assert got.shape == (3, 2)
    assert np.isnan(got[:, 1]).all() and np.isnan(got[1, :]).all()
    assert np.isfinite(got[[0, 2], 0]).all()


def test_dict_input_equals_list_input():
    layers = [to_torch(a) for a in _layers(8)]
    by_name = F.similarity_matrix(dict(zip("abcd", layers)), measure="rv2")
    by_list = F.similarity_matrix(layers, measure="rv2")
    np.testing.assert_allclose(by_name.numpy(), by_list.numpy(), rtol=0, atol=1e-14)


def test_healthy_layers_do_not_warn():
    _, messages = call_recording(F.similarity_matrix, [to_torch(a) for a in _layers(9)], measure="linear_cka")
    assert messages == []


def test_errors():
    xs = [to_torch(a) for a in _layers(10)]
    with pytest.raises(RepSimValueError, match="not_a_measure"):
        F.similarity_matrix(xs, measure="not_a_measure")
    with pytest.raises(RepSimValueError, match=rf"\({N}, 3\).*\({N + 1}, 3\)"):
        F.similarity_matrix(xs + [randn(N + 1, 3)])
    with pytest.raises(RepSimValueError, match="late_layer"):  # the dict name of the odd one out
        F.similarity_matrix(xs, {"late_layer": randn(N + 1, 3)})
    with pytest.raises(RepSimValueError, match="reshape"):
        F.similarity_matrix(xs + [randn(N, 3, 2)])
    with pytest.raises(RepSimValueError, match="rbf"):
        F.similarity_matrix(xs, measure="rbf_cka", method="features")


# --- Representations: statistics prepared once and reused across calls ------------------------------


@pytest.mark.parametrize("method", ["auto", "features", "gram"])
def test_representations_reused_across_measures_equal_fresh_calls(method):
    """One object meets every case in turn (rv2's zeroed diagonal must not leak into the cached Grams)."""
    xs, ys = [to_torch(a) for a in _layers(0)], [to_torch(b) for b in _layers(1, widths=(6, 2, 9))]
    reps_x, reps_y = F.Representations(xs), F.Representations(ys)
    for measure, options in CASES * 2:
        if (measure, method) == ("rbf_cka", "features"):
            continue
        got = F.similarity_matrix(reps_x, reps_y, measure, method=method, **options)
        np.testing.assert_allclose(
            got.numpy(), _cached_loop(measure, options), rtol=0, atol=1e-10, err_msg=f"{measure} {options}"
        )


def test_representations_compute_each_gram_once(monkeypatch):
    import sys

    engine = sys.modules["lightning_repsim.functional._prepared"]  # where the Grams are formed and cached
    calls = []
    original = engine.self_product
    monkeypatch.setattr(engine, "self_product", lambda x, **kw: calls.append(x.shape) or original(x, **kw))
    xs = F.Representations([to_torch(a) for a in _layers(0)])
    ys = F.Representations([to_torch(b) for b in _layers(1, widths=(6, 2, 9))])
    for measure in ("linear_cka", "debiased_cka", "rv2", "rv"):
        F.similarity_matrix(xs, ys, measure, method="gram")
    assert len(calls) == 4 + 3  # one centred Gram per layer, shared by all four measures
    F.similarity_matrix(xs, ys, "rv2", method="gram", center=False)
    assert len(calls) == 2 * (4 + 3)  # uncentred features are another variant


def test_representations_multiply_feature_space_products_once(monkeypatch):
    """Linear CKA, debiased CKA, RV and RV2 on centred features share ||X_iᵀ Y_j||² per pair of sides."""
    import sys

    prepared = sys.modules["lightning_repsim.functional._prepared"]
    calls = []
    original = prepared.squared_cross_norms
    monkeypatch.setattr(prepared, "squared_cross_norms", lambda *a: calls.append(len(a[0])) or original(*a))
    xs = F.Representations([to_torch(a) for a in _layers(0)])
    ys = F.Representations([to_torch(b) for b in _layers(1, widths=(6, 2, 9))])
    for measure in ("linear_cka", "debiased_cka", "rv2", "rv"):
        F.similarity_matrix(xs, ys, measure, method="features")
    assert calls.count(4) == 1  # the cross products, once; the rest are each side's self terms
    for measure in ("linear_cka", "rv2"):
        F.similarity_matrix(xs, None, measure, method="features")
    assert calls.count(4) == 2  # one triangle of xs against itself, once for both measures
    fresh = F.similarity_matrix([to_torch(a) for a in _layers(0)], None, "rv2", method="features")
    np.testing.assert_array_equal(F.similarity_matrix(xs, None, "rv2", method="features").numpy(), fresh.numpy())


def test_representations_cache_budget_is_respected():
    layers = [to_torch(a) for a in _layers(0)]
    gram_bytes = N * N * 8
    for budget, cached in [(0, 0), (2 * gram_bytes + 1, 2), (10**9, 4)]:
        reps = F.Representations(layers, max_cache_bytes=budget)
        F.similarity_matrix(reps, None, "linear_cka", method="gram")
        F.similarity_matrix(reps, None, "rv2", center=False, method="gram")  # competes for the same budget
        held = sum(len(p._grams) for p in reps._prepared.values())
        assert held == min(cached * 2, budget // gram_bytes), (budget, held)


@pytest.mark.parametrize("numpy_blas", [True, False])
@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rv2"])
def test_cpu_products_agree_in_numpy_and_torch(monkeypatch, numpy_blas, measure):
    """The CPU Gram route multiplies in NumPy (SYRK) or in torch depending on size and threads: same numbers."""
    from lightning_repsim.functional import _validation

    monkeypatch.setattr(_validation, "use_numpy_blas", lambda work: numpy_blas)
    xs, ys = [to_torch(a) for a in _layers(0)], [to_torch(b) for b in _layers(1, widths=(6, 2, 9))]
    for other in (ys, None):
        got = F.similarity_matrix(xs, other, measure, method="gram")
        want = F.similarity_matrix(xs, other, measure, method="features")
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)


GRAM_CASES = [(m, o) for m, o in CASES if m not in ("svcca", "pwcca")]


@pytest.mark.parametrize("numpy_blas", [True, False])
@pytest.mark.parametrize("measure, options", GRAM_CASES, ids=[f"{m}-{o}" for m, o in GRAM_CASES])
def test_float32_products_agree_with_float64(monkeypatch, measure, options, numpy_blas):
    """product_dtype=float32 (the CUDA default, here on CPU) stays within 1e-6 of float64, on both routes,
    also for features far from zero mean (centring is done in float64 before the cast)."""
    from lightning_repsim.functional import _validation

    monkeypatch.setattr(_validation, "use_numpy_blas", lambda work: numpy_blas)
    xs = [to_torch(a + 50.0).float() for a in _layers(0)]
    ys = [to_torch(np.maximum(b, 0.0) * 20.0 + 3.0).float() for b in _layers(1, widths=(6, 2, 9))]
    for method in ("features", "gram"):
        if measure == "rbf_cka" and method == "features":
            continue
        for other in (ys, None):
            want = F.similarity_matrix(xs, other, measure, method=method, **options)
            got = F.similarity_matrix(xs, other, measure, method=method, product_dtype=torch.float32, **options)
            assert got.dtype == torch.float64
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6, err_msg=method)


def test_product_dtype_by_name_and_bad_value():
    xs = [to_torch(a) for a in _layers(0)]
    by_name = F.similarity_matrix(xs, measure="rv2", product_dtype="float32")
    by_dtype = F.similarity_matrix(xs, measure="rv2", product_dtype=torch.float32)
    assert torch.equal(by_name, by_dtype)
    with pytest.raises(RepSimValueError, match="product_dtype must be torch.float32, torch.float64"):
        F.similarity_matrix(xs, measure="rv2", product_dtype=torch.float16)


def test_representations_keep_float32_and_float64_products_apart():
    """A Gram cached in float32 products must not serve a later float64 call."""
    layers = [to_torch(a + 50.0) for a in _layers(0)]
    reps = F.Representations(layers)
    fast = F.similarity_matrix(reps, None, "linear_cka", method="gram", product_dtype=torch.float32)
    exact = F.similarity_matrix(reps, None, "linear_cka", method="gram")
    fresh = F.similarity_matrix(layers, None, "linear_cka", method="gram")
    np.testing.assert_allclose(exact.numpy(), fresh.numpy(), rtol=0, atol=1e-13)
    assert float((fast - fresh).abs().max()) > 0  # it really was another computation


@pytest.mark.parametrize("method", ["features", "gram"])
def test_float32_products_report_non_finite_layers(method):
    layers = {f"l{i}": to_torch(a) for i, a in enumerate(_layers(0))}
    layers["l2"] = layers["l2"].clone()
    layers["l2"][3, 1] = float("nan")
    with pytest.warns(RepSimWarning, match="l2: it contains NaN or Inf"):
        got = F.similarity_matrix(layers, measure="debiased_cka", method=method, product_dtype="float32")
    assert torch.isnan(got[2]).all() and torch.isnan(got[:, 2]).all()
    assert not torch.isnan(got[[0, 1, 3]][:, [0, 1, 3]]).any()


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("measure, options", GRAM_CASES, ids=[f"{m}-{o}" for m, o in GRAM_CASES])
def test_accelerator_route_agrees_with_host_route(monkeypatch, measure, options, product_dtype):
    """The torch-only route that CUDA takes, forced on CPU tensors: same numbers as the NumPy route,
    NaN layers included, so a GPU run exercises no code that never ran here."""
    import sys

    engine = sys.modules["lightning_repsim.functional._engine"]
    prepared = sys.modules["lightning_repsim.functional._prepared"]
    xs = {f"x{i}": to_torch(a + 5.0) for i, a in enumerate(_layers(0))}
    xs["x1"] = xs["x1"].clone()
    xs["x1"][0, 0] = float("inf")
    ys = [to_torch(b) for b in _layers(1, widths=(6, 2, 9))]
    for method in ("features", "gram"):
        if measure == "rbf_cka" and method == "features":
            continue
        for other in (ys, None):
            with pytest.warns(RepSimWarning, match="x1: it contains NaN or Inf"):
                host = F.similarity_matrix(xs, other, measure, method=method, product_dtype=product_dtype, **options)
            with monkeypatch.context() as patch:
                for module in (engine, prepared):  # the route is taken in both
                    patch.setattr(module, "host_route", lambda device: False)
                with pytest.warns(RepSimWarning, match="x1: it contains NaN or Inf"):
                    torch_only = F.similarity_matrix(
                        xs, other, measure, method=method, product_dtype=product_dtype, **options
                    )
            atol = 1e-12 if product_dtype == torch.float64 else 1e-6
            np.testing.assert_allclose(torch_only.numpy(), host.numpy(), rtol=0, atol=atol, err_msg=method)


FAR_CASES = [
    ("offset", 1e4, torch.float64),
    ("offset", 1e6, torch.float64),
    ("scale", 1e20, torch.float64),
    ("scale", 1e-30, torch.float32),
    ("scale", 1e-200, torch.float64),
]


@pytest.mark.parametrize("host", [True, False], ids=["numpy-route", "torch-route"])
@pytest.mark.parametrize("kind, value, dtype", FAR_CASES, ids=[f"{k}-{v:g}-{d}" for k, v, d in FAR_CASES])
def test_float32_products_keep_far_offsets_and_extreme_scales(monkeypatch, kind, value, dtype, host):
    """Centring in float32 keeps no residue of a large mean, and layers are scaled into float32's range:
    every centred measure ignores offsets and scales, so float32 products must give the float64 values
    of the untouched layers, on both routes and without a warning."""
    import sys

    for module in ("_engine", "_prepared"):  # the route is taken in both
        monkeypatch.setattr(sys.modules[f"lightning_repsim.functional.{module}"], "host_route", lambda device: host)
    layers = [to_torch(a) for a in _layers(0)]
    moved = [(m + value if kind == "offset" else m * value).to(dtype) for m in layers]
    for measure in ("linear_cka", "rv2", "debiased_cka", "rbf_cka"):
        for method in ("features", "gram"):
            if measure == "rbf_cka" and method == "features":
                continue
            want = F.similarity_matrix(layers, measure=measure, method=method)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RepSimWarning)
                got = F.similarity_matrix(moved, measure=measure, method=method, product_dtype=torch.float32)
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6, err_msg=f"{measure} {method}")


def test_product_dtype_is_validated_for_cca_measures_too():
    xs = [to_torch(a) for a in _layers(0)]
    with pytest.raises(RepSimValueError, match="product_dtype"):
        F.similarity_matrix(xs, measure="svcca", product_dtype="float16")


@pytest.mark.parametrize("offset", [0.0, 20.0, 1e4])
def test_float32_inputs_far_from_zero_are_centred_exactly(offset):
    """float32 inputs take a fast float32 mean; one whose mean is far beyond its spread (1e4 here) must
    be centred again exactly, or its mean's rounding residue shows in RV2 and linear CKA."""
    layers = [(to_torch(a) + offset).float() for a in _layers(0)]
    for measure in ("rv2", "linear_cka"):
        want = F.similarity_matrix(layers, measure=measure, method="gram")
        got = F.similarity_matrix(layers, measure=measure, method="gram", product_dtype=torch.float32)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6, err_msg=measure)
