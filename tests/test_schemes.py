"""RMSNorm, Ghost BatchNorm, Weight and Spectral Normalization against the
float64 reference, their semantics, and the engine's uncentered statistics."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import normkit
from normkit import _bench, engine
from normkit import reference as ref

TOL = {np.float16: 5e-3, np.float32: 2e-5, np.float64: 1e-11}
DTYPES = tuple(TOL)


def _data(shape, dtype=np.float64, seed=0, loc=1.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def _close(actual, expected, dtype):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale
    assert error <= TOL[np.dtype(dtype).type], error


def _check_against_reference(name, x, *args):
    """normkit's ``name`` and ``name_backward`` against the float64
    reference functions of the same names, all called with ``args``."""
    dy = _data(x.shape, x.dtype, seed=2, loc=0.0, scale=1.0)
    y, saved = getattr(normkit, name)(x, *args, return_saved=True)
    assert y.dtype == x.dtype
    _close(y, getattr(ref, name)(x, *args), x.dtype)
    grads = getattr(normkit, f"{name}_backward")(dy, x, saved)
    expected = getattr(ref, f"{name}_backward")(dy, x, *args)
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        _close(got, want, x.dtype)


# --------------------------------------------------------------------------
# the engine's statistics about zero
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 70000)])
def test_uncentered_moments_are_the_mean_square(shape):
    x = _data(shape, np.float32, loc=1e3, scale=1.0)
    view = engine.trailing_view(x.shape, 1)
    mean, mean_square = engine.moments(x, view, centered=False)
    rows = x.astype(np.float64).reshape(view.P, -1)
    assert np.all(mean == 0)
    np.testing.assert_allclose(mean_square[:, 0], (rows ** 2).mean(axis=1), rtol=1e-12)


@pytest.mark.parametrize("dims", [(2, 3, 4, 1, 5), (1, 6, 4, 1, 7), (3, 1, 1, 40, 1),
                                  (1, 70000, 2, 1, 1)])
def test_uncentered_normalize_and_backward_on_any_view(dims):
    view = engine.View(*dims)
    x = _data((view.P * view.A * view.K * view.J * view.B,), seed=3)
    dy = _data(x.shape, seed=4, loc=0.0, scale=1.0)
    gamma = _data((view.K * view.J,), seed=5, loc=1.0, scale=0.2)
    y, saved = normkit.normalize(x, view, gamma, None, 1e-3, return_saved=True,
                                 centered=False)
    groups = x.reshape(view.P, view.A, view.K, view.J * view.B)
    rstd = 1.0 / np.sqrt((groups ** 2).mean(axis=(1, 3), keepdims=True) + 1e-3)
    g_full = np.repeat(gamma.reshape(view.K, view.J), view.B, axis=1)[None, None]
    expected = groups * rstd * g_full
    _close(y.reshape(groups.shape), expected, np.float64)
    dx, dgamma, _ = normkit.normalize_backward(dy, x, saved)
    g = dy.reshape(groups.shape) * g_full
    xhat = groups * rstd
    dx_ref = rstd * (g - xhat * (g * xhat).mean(axis=(1, 3), keepdims=True))
    _close(dx.reshape(groups.shape), dx_ref, np.float64)
    dg_ref = (dy.reshape(groups.shape) * xhat).sum(axis=(0, 1)).reshape(
        view.K, view.J, view.B).sum(axis=2).reshape(-1)
    _close(dgamma, dg_ref, np.float64)


# --------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, normalized", [((4, 6), (6,)), ((2, 3, 4, 5), (4, 5)),
                                               ((3, 4096), (4096,))])
def test_rms_norm_matches_reference(dtype, shape, normalized):
    w = _data(normalized, dtype, seed=1, loc=1.0, scale=0.3)
    _check_against_reference("rms_norm", _data(shape, dtype), normalized, w)


def test_rms_norm_default_eps_is_the_dtype_machine_epsilon():
    x = np.full((2, 3), 1e-4)
    for dtype in (np.float32, np.float64):
        expected = 1e-4 / np.sqrt(1e-8 + np.finfo(dtype).eps)
        np.testing.assert_allclose(normkit.rms_norm(x.astype(dtype), 3),
                                   expected, rtol=1e-6)
    assert normkit.RMSNorm(3).eps is None
    layer = normkit.RMSNorm(3, eps=0.5, elementwise_affine=False)
    np.testing.assert_allclose(layer(x), 1e-4 / np.sqrt(1e-8 + 0.5))
    assert layer.state_dict() == {}


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_rms_norm_is_invariant_to_scaling_the_input(scale, seed):
    x = _data((3, 8), seed=seed)
    np.testing.assert_allclose(normkit.rms_norm(scale * x, 8, eps=0.0),
                               normkit.rms_norm(x, 8, eps=0.0), rtol=1e-10,
                               atol=1e-12)


def test_rms_norm_layer_has_a_gain_and_no_bias():
    layer = normkit.RMSNorm((3, 2))
    assert layer.bias is None and layer.weight.shape == (3, 2)
    x = _data((4, 3, 2))
    layer(x)
    layer.backward(np.ones_like(x))
    assert set(layer.grads) == {"weight"}


# --------------------------------------------------------------------------
# Ghost BatchNorm
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, v", [((8, 3, 5), 1, 2), ((6, 4, 4, 3), -1, 3),
                                            ((12, 5), 1, 4), ((4, 3, 2, 2), 1, 4)])
def test_ghost_batch_norm_training_matches_reference(dtype, shape, axis, v):
    x = _data(shape, dtype)
    C = shape[axis]
    w = _data((C,), dtype, seed=1, loc=1.0, scale=0.3)
    b = _data((C,), dtype, seed=2, loc=0.0, scale=0.3)
    rm, rv = np.zeros(C), np.ones(C)
    expected, erm, erv = ref.ghost_batch_norm(x, v, rm, rv, w, b, True, 0.1,
                                              1e-5, axis)
    y, saved = normkit.ghost_batch_norm(x, v, rm, rv, w, b, True, 0.1, 1e-5,
                                        axis, return_saved=True)
    _close(y, expected, dtype)
    _close(rm, erm, dtype)
    _close(rv, erv, dtype)
    dy = _data(shape, dtype, seed=3, loc=0.0, scale=1.0)
    for got, want in zip(normkit.ghost_batch_norm_backward(dy, x, saved),
                         ref.ghost_batch_norm_backward(dy, x, v, None, None, w, b,
                                                       True, 1e-5, axis)):
        _close(got, want, dtype)


def test_ghost_batch_norm_with_one_ghost_batch_is_batch_norm():
    x = _data((6, 3, 4))
    rm, rv, rm2, rv2 = np.zeros(3), np.ones(3), np.zeros(3), np.ones(3)
    y = normkit.ghost_batch_norm(x, 6, rm, rv, training=True)
    np.testing.assert_allclose(y, normkit.batch_norm(x, rm2, rv2, training=True),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, rm2, rtol=1e-12)
    np.testing.assert_allclose(rv, rv2, rtol=1e-12)


def test_ghost_batches_are_normalized_independently():
    x = _data((4, 2, 3))
    x[2:] = 100.0 + 5.0 * x[2:]          # a very different second ghost batch
    y = normkit.ghost_batch_norm(x, 2, training=True)
    np.testing.assert_allclose(y[:2], normkit.batch_norm(x[:2], training=True),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[2:], normkit.batch_norm(x[2:], training=True),
                               rtol=1e-10, atol=1e-10)


def test_ghost_running_statistics_are_the_mean_of_ghost_statistics():
    x = _data((6, 2, 5), seed=7)
    layer = normkit.GhostBatchNorm(2, 3, momentum=None)
    layer(x)
    ghosts = x.reshape(2, 3, 2, 5).transpose(0, 2, 1, 3).reshape(2, 2, 15)
    np.testing.assert_allclose(layer.running_mean, ghosts.mean(axis=2).mean(axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(layer.running_var,
                               ghosts.var(axis=2, ddof=1).mean(axis=0), rtol=1e-12)
    layer(2.0 * x)   # cumulative average over calls with momentum=None
    np.testing.assert_allclose(layer.running_mean,
                               1.5 * ghosts.mean(axis=2).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var,
                               2.5 * ghosts.var(axis=2, ddof=1).mean(axis=0),
                               rtol=1e-12)
    assert layer.num_batches_tracked == 2


@pytest.mark.parametrize("axis", [1, -1])
def test_ghost_inference_is_batch_norm_inference_for_any_batch_size(axis):
    layer = normkit.GhostBatchNorm(3, 4, axis=axis)
    shape = (8, 3, 5) if axis == 1 else (8, 5, 3)
    for seed in range(3):
        layer(_data(shape, seed=seed))
    layer.weight[...] = [0.5, 1.0, 2.0]
    layer.bias[...] = [0.1, -0.2, 0.3]
    layer.eval()
    for n in (1, 3, 8):                    # 1 and 3 are not multiples of 4
        x = _data((n,) + shape[1:], seed=10 + n)
        expected = ref.batch_norm(x, layer.running_mean, layer.running_var,
                                  layer.weight, layer.bias, False, axis=axis)[0]
        before = layer.state_dict()
        np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
        plain = normkit.batch_norm(x, layer.running_mean.copy(),
                                   layer.running_var.copy(), layer.weight,
                                   layer.bias, axis=axis)
        np.testing.assert_array_equal(layer(x), plain)
        for name, value in layer.state_dict().items():
            np.testing.assert_array_equal(value, before[name])


def test_ghost_batch_not_divisible_raises_before_any_change():
    layer = normkit.GhostBatchNorm(3, 4)
    with pytest.raises(ValueError, match="virtual_batch_size must divide the batch size 6"):
        layer(_data((6, 3, 2)))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normkit.ghost_batch_norm(_data((4, 3)), 1, training=True)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        normkit.GhostBatchNorm(3, 0)


# --------------------------------------------------------------------------
# Weight Normalization
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((5, 7), 0), ((4, 3, 3, 3), 0), ((6, 8), 1),
                                         ((3, 4, 5), -1)])
def test_weight_norm_matches_reference(dtype, shape, axis):
    g = _data((shape[axis],), dtype, seed=1, loc=1.0, scale=0.5)
    _check_against_reference("weight_norm", _data(shape, dtype), g, axis)


def test_weight_norm_unit_norms_equal_g_and_initialize_starts_at_v():
    v = _data((4, 3, 2))
    layer = normkit.WeightNorm(4)
    layer.g[...] = [1.0, 2.0, 3.0, 0.5]
    w = layer(v)
    np.testing.assert_allclose(np.sqrt((w ** 2).sum(axis=(1, 2))), layer.g, rtol=1e-12)
    np.testing.assert_allclose(normkit.WeightNorm(4).initialize(v)(v), v, rtol=1e-12)


# --------------------------------------------------------------------------
# Spectral Normalization
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [((5, 7), 0), ((4, 3, 2, 2), 0), ((6, 4), 1)])
def test_spectral_norm_matches_reference_in_training(shape, axis):
    w = _data(shape)
    rows = shape[axis]
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal(rows), rng.standard_normal(w.size // rows)
    expected, eu, ev = ref.spectral_norm(w, u, v, 2, 1e-12, True, axis)
    y, saved = normkit.spectral_norm(w, u, v, 2, 1e-12, True, axis,
                                     return_saved=True)
    _close(y, expected, np.float64)
    np.testing.assert_allclose(u, eu, rtol=1e-12)
    np.testing.assert_allclose(v, ev, rtol=1e-12)
    dy = _data(shape, seed=4, loc=0.0, scale=1.0)
    _close(normkit.spectral_norm_backward(dy, w, saved),
           ref.spectral_norm_backward(dy, w, eu, ev, axis), np.float64)


def test_spectral_norm_converges_to_the_largest_singular_value():
    w = _data((6, 4, 3), seed=8).astype(np.float32)
    layer = normkit.SpectralNorm(w.shape)
    for _ in range(60):
        y = layer(w)
    assert y.dtype == np.float32
    top = np.linalg.svd(w.reshape(6, -1).astype(np.float64), compute_uv=False)[0]
    np.testing.assert_allclose(np.linalg.svd(y.reshape(6, -1).astype(np.float64),
                                             compute_uv=False)[0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.abs(w).max() / np.abs(y).max(), top, rtol=1e-5)


def test_spectral_norm_updates_its_vectors_in_training_only():
    w = _data((5, 6))
    layer = normkit.SpectralNorm(w.shape)
    u0 = layer.u.copy()
    layer.eval()
    y_eval = layer(w)
    np.testing.assert_array_equal(layer.u, u0)
    expected = w / (u0 @ w @ layer.v)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-12)
    layer.train()
    layer(w)
    assert not np.allclose(layer.u, u0)
    assert np.isclose(np.linalg.norm(layer.u), 1.0)


def test_spectral_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eps must be > 0"):
        normkit.spectral_norm(_data((3, 2)), np.ones(3), np.ones(2), eps=0.0)
    with pytest.raises(ValueError, match="u must have shape"):
        normkit.spectral_norm(_data((3, 2)), np.ones(2), np.ones(2))
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        normkit.spectral_norm(_data((3, 2)), frozen, np.ones(2))
    normkit.spectral_norm(_data((3, 2)), frozen, np.ones(2), training=False)
    with pytest.raises(TypeError, match="weight_shape must be a tuple of ints"):
        normkit.SpectralNorm(7)


# --------------------------------------------------------------------------
# the benchmark script's cases of the new schemes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", [_bench.Case("rms_norm", (6, 16), -1, "float64"),
                                  _bench.Case("ghost_batch_norm", (8, 3, 5), 1,
                                              "float64", virtual_batch_size=4)],
                         ids=lambda case: case.variant)
def test_benchmark_cases_of_new_schemes_agree_with_reference(case):
    inputs = _bench.make_inputs(case)
    expected = _bench.reference_forward_backward(case.variant, inputs)
    actual = _bench.normkit_forward_backward(case.variant, inputs)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        _close(got, want, np.float64)
    timed = _bench.implementations(case, inputs)
    assert ("torch fwd" in timed) == (_bench.torch is not None
                                      and case.variant == "rms_norm")
    for name in ("fwd", "fwd+bwd", "ref fwd"):
        timed[name]()
