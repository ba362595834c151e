"""Backward pass: engine vs reference, engine vs finite differences, layers."""

import dataclasses

import numpy as np
import pytest

import normkit

from conftest import (BFLOAT16, MATRIX_ARGS, VARIANT_NAMES, VARIANTS, assert_close_scaled,
                      make_case, make_layer, matrix, nk_backward, nk_forward,
                      numerical_grad, ref_backward)
from test_reference import PINNED_RENORM, SATURATED_RENORM


def check_grads(got, expected, dtype, affine, factor=1.0):
    dx, dw, db = got
    edx, edw, edb = expected
    assert_close_scaled(dx, edx, dtype, factor, what="dx")
    if affine:
        assert_close_scaled(dw, edw, dtype, factor * 10, what="dweight")
        assert_close_scaled(db, edb, dtype, factor * 10, what="dbias")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize(MATRIX_ARGS, matrix(ndims=(2, 3, 4)))
def test_backward_matches_reference(name, ndim, layout, mode, affine, dtype, rng):
    case = make_case(name, ndim, layout, mode, affine, dtype=dtype, rng=rng)
    (y, saved), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=y.shape).astype(dtype)
    got = nk_backward(case, dy, saved)
    assert got[0].dtype == np.dtype(dtype)
    assert got[0].shape == case.x.shape
    check_grads(got, ref_backward(case, dy), dtype, affine)


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("name,mode", [(n, m) for n in VARIANT_NAMES
                                       for m in VARIANTS[n].modes()])
def test_bfloat16_backward_matches_reference(name, mode, layout, rng):
    case = make_case(name, 3, layout, mode, True, dtype=BFLOAT16, rng=rng)
    (y, saved), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=y.shape).astype(BFLOAT16)
    got = nk_backward(case, dy, saved)
    assert got[0].dtype == BFLOAT16 and got[0].shape == case.x.shape
    check_grads(got, ref_backward(case, dy), BFLOAT16, True)


def fd_params():
    params = []
    for name in VARIANT_NAMES:
        for mode in VARIANTS[name].modes():
            for layout in ("first", "last"):
                extras = [("", {})]
                if name == "batch_renorm" and mode == "train":
                    extras = [("saturated", SATURATED_RENORM), ("pinned", PINNED_RENORM)]
                for tag, extra in extras:
                    params.append(pytest.param(name, mode, layout, extra,
                                               id=f"{name}-{mode}-{layout}-{tag}"))
    return params


@pytest.mark.parametrize("name,mode,layout,extra", fd_params())
def test_backward_matches_finite_differences(name, mode, layout, extra, rng):
    case = make_case(name, 3, layout, mode, True, rng=rng, **extra)
    (y, saved), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=y.shape)
    dx, dw, db = nk_backward(case, dy, saved)

    def loss(x=None, **overrides):
        c = case if x is None else dataclasses.replace(case, x=x)
        return float(np.sum(nk_forward(c, **overrides)[0] * dy))

    atol = 1e-6 * max(1.0, np.abs(dx).max())
    np.testing.assert_allclose(dx, numerical_grad(lambda a: loss(x=a), case.x),
                               rtol=0, atol=atol)
    np.testing.assert_allclose(dw, numerical_grad(lambda a: loss(weight=a),
                                                  case.kwargs["weight"]),
                               rtol=0, atol=atol)
    np.testing.assert_allclose(db, numerical_grad(lambda a: loss(bias=a),
                                                  case.kwargs["bias"]),
                               rtol=0, atol=atol)


@pytest.mark.parametrize(MATRIX_ARGS, matrix(ndims=(3, 4), dtypes=(np.float32, np.float64)))
def test_layer_forward_backward_and_grads(name, ndim, layout, mode, affine, dtype, rng):
    case = make_case(name, ndim, layout, mode, affine, dtype=dtype, rng=rng)
    layer = make_layer(case)
    expected_y, _ = nk_forward(case)
    y = layer(case.x)
    assert y.dtype == np.dtype(dtype)
    assert_close_scaled(y, expected_y, dtype, what="layer y")
    dy = rng.normal(size=y.shape).astype(dtype)
    dx = layer.backward(dy)
    edx, edw, edb = ref_backward(case, dy)
    assert dx.dtype == np.dtype(dtype)
    assert_close_scaled(dx, edx, dtype, what="layer dx")
    if affine:
        assert set(layer.grads) >= {"weight", "bias"}
        assert_close_scaled(layer.grads["weight"], edw, dtype, 10, what="grad weight")
        assert_close_scaled(layer.grads["bias"], edb, dtype, 10, what="grad bias")


@pytest.mark.parametrize("name,mode", [(n, m) for n in VARIANT_NAMES
                                       for m in VARIANTS[n].modes()])
def test_layer_backward_uses_most_recent_forward(name, mode, rng):
    case = make_case(name, 3, "first", mode, True, rng=rng)
    other = make_case(name, 3, "first", mode, True, rng=rng)
    layer = make_layer(case)
    layer(other.x)
    # the running statistics seen by the last forward
    for key in case.variant.stat_names:
        case.kwargs[key] = getattr(layer, key).copy()
    layer(case.x)
    dy = rng.normal(size=case.x.shape)
    dx = layer.backward(dy)
    assert_close_scaled(dx, ref_backward(case, dy)[0], np.float64)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_backward_leaves_inputs_untouched(name, rng):
    case = make_case(name, 3, "first", "train", True, rng=rng)
    (y, saved), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=y.shape)
    dy_before, x_before = dy.copy(), case.x.copy()
    nk_backward(case, dy, saved)
    np.testing.assert_array_equal(dy, dy_before)
    np.testing.assert_array_equal(case.x, x_before)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_saved_holds_statistics_not_xhat(name, rng):
    """``saved`` keeps small per-group statistics and references the weight."""
    case = make_case(name, 5, "first", "train", True, rng=rng)
    (_, saved), used = nk_forward(case, return_saved=True)
    fields = getattr(saved, "__dict__", None) or {
        k: getattr(saved, k) for k in dir(saved) if not k.startswith("_")}
    arrays = [v for v in fields.values() if isinstance(v, np.ndarray)]
    assert arrays, "saved exposes no statistics"
    for a in arrays:
        assert a.size < case.x.size, a.shape
    assert any(np.shares_memory(a, used["weight"]) for a in arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, "bfloat16"])
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm"])
def test_gradients_of_wide_parameters_match_the_reference(variant, dtype, rng):
    """Parameters of :data:`~normkit.schemes.base.DIRECT_GRADIENTS` values
    or more get their gradients written by the backend in their own dtype
    and shape (over two rows: by the column kernels): the same values as
    the reference's, and as the float64 sums of the engine rounded once."""
    from normkit import reference
    from normkit.schemes.base import DIRECT_GRADIENTS
    if dtype == "bfloat16":
        if BFLOAT16 is None:
            pytest.skip("needs ml_dtypes")
        dtype = BFLOAT16
    width = DIRECT_GRADIENTS + 7
    x = rng.normal(1.0, 2.0, (2, 1, width)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, (1, width)).astype(dtype)
    kwargs = {"weight": weight}
    if variant == "layer_norm":
        kwargs["bias"] = rng.standard_normal((1, width)).astype(dtype)
    forward = getattr(normkit, variant)
    y, saved = forward(x, (1, width), **kwargs, return_saved=True)
    got = getattr(normkit, f"{variant}_backward")(dy, x, saved)
    f64 = {k: v.astype(np.float64) for k, v in kwargs.items()}
    want = getattr(reference, f"{variant}_backward")(
        dy.astype(np.float64), x.astype(np.float64), (1, width), **f64)
    assert got[1].dtype == np.dtype(dtype) and got[1].shape == weight.shape
    assert_close_scaled(got[0], want[0], dtype, what="dx")
    assert_close_scaled(got[1], want[1], dtype, 10, what="dweight")
    if variant == "layer_norm":
        assert got[2].dtype == np.dtype(dtype) and got[2].shape == weight.shape
        assert_close_scaled(got[2], want[2], dtype, 10, what="dbias")
    else:  # RMSNorm has no bias: (dx, dweight)
        assert len(got) == 2
    # the engine's float64 sums, rounded once, are what the layer returns
    _, _, sum_dy_xhat = normkit.engine.backward(
        dy, x, saved.view, saved.mean, saved.rstd, weight.reshape(-1),
        centered=variant == "layer_norm")
    ulp = {1: 2 ** -7, 2: 2 ** -10, 4: 2 ** -23, 8: 2 ** -52}
    np.testing.assert_allclose(
        got[1].reshape(-1).astype(np.float64),
        sum_dy_xhat.astype(dtype).astype(np.float64),
        rtol=ulp[np.dtype(dtype).itemsize if np.dtype(dtype) != BFLOAT16 else 1],
        atol=1e-12)


@pytest.mark.parametrize(MATRIX_ARGS, matrix(ndims=(3,), affines=(True,)))
def test_gradients_written_by_the_backend_equal_the_cast_sums(
        name, ndim, layout, mode, affine, dtype, rng, monkeypatch):
    """Every variant's gradients with the backend writing them in the
    parameters' dtype (``affine_out``, forced for every size here) equal
    those cast from the float64 sums (the default for small parameters):
    shapes, dtypes and values."""
    import normkit.schemes.base as base
    case = make_case(name, ndim, layout, mode, affine, dtype=dtype, rng=rng)
    (y, saved), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=y.shape).astype(dtype)
    cast = nk_backward(case, dy, saved)
    monkeypatch.setattr(base, "DIRECT_GRADIENTS", 1)
    direct = nk_backward(case, dy, saved)
    assert len(direct) == len(cast)
    for d, c in zip(direct, cast):
        if c is None:
            assert d is None
            continue
        assert d.dtype == c.dtype and d.shape == c.shape
        assert_close_scaled(d, c, dtype, what=name)
