"""Backward pass: engine vs reference, engine vs finite differences, layers."""

import dataclasses

import numpy as np
import pytest

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
