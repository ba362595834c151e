"""Forward pass of every variant against the float64 reference."""

import numpy as np
import pytest

from conftest import (BFLOAT16, MATRIX_ARGS, VARIANT_NAMES, VARIANTS,
                      assert_close_scaled, make_case, matrix, nk_forward,
                      ref_forward)


@pytest.mark.parametrize(MATRIX_ARGS, matrix())
def test_forward_matches_reference(name, ndim, layout, mode, affine, dtype, rng):
    case = make_case(name, ndim, layout, mode, affine, dtype=dtype, rng=rng)
    y, used = nk_forward(case)
    expected, new_stats = ref_forward(case)
    assert isinstance(y, np.ndarray)
    assert y.dtype == np.dtype(dtype)
    assert y.shape == case.x.shape
    assert_close_scaled(y, expected, dtype, what="y")
    # running statistics are updated in place exactly like the reference
    for key, value in new_stats.items():
        assert_close_scaled(used[key], value, dtype, what=key)


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("name,mode", [(n, m) for n in VARIANT_NAMES
                                       for m in VARIANTS[n].modes()])
def test_bfloat16_forward_matches_reference(name, mode, layout, rng):
    """bfloat16 read and written by the kernels (no widened copy), against
    the float64 reference on the same bfloat16 values."""
    case = make_case(name, 4, layout, mode, True, dtype=BFLOAT16, rng=rng)
    y, used = nk_forward(case)
    expected, new_stats = ref_forward(case)
    assert y.dtype == BFLOAT16 and y.shape == case.x.shape
    assert_close_scaled(y, expected, BFLOAT16, what="y")
    for key, value in new_stats.items():
        assert_close_scaled(used[key], value, BFLOAT16, what=key)


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_return_saved_gives_same_output(name, dtype, rng):
    case = make_case(name, 4, "first", "train", True, dtype=dtype, rng=rng)
    plain, _ = nk_forward(case)
    out, _ = nk_forward(case, return_saved=True)
    assert isinstance(out, tuple) and len(out) == 2
    np.testing.assert_array_equal(out[0], plain)


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_input(name, layout, dtype, rng):
    """A transposed view and a strided slice give the contiguous answer."""
    base = make_case(name, 4, layout, "train", True, dtype=dtype, rng=rng)
    expected, _ = nk_forward(base)
    # same values stored transposed: .T.copy().T is a non-contiguous view
    x_view = np.ascontiguousarray(base.x.T).T
    assert not x_view.flags.c_contiguous
    base_view = make_case(name, 4, layout, "train", True, dtype=dtype,
                          rng=np.random.default_rng(1), x=x_view)
    base_view.kwargs = base.kwargs
    got, _ = nk_forward(base_view)
    np.testing.assert_allclose(got, expected, rtol=0,
                               atol=10 * np.finfo(dtype).eps * np.abs(expected).max())
    # a strided slice along the batch axis
    wide = np.repeat(base.x, 2, axis=0)[::2]
    assert not wide.flags.c_contiguous
    base_view.x = wide
    got, _ = nk_forward(base_view)
    np.testing.assert_allclose(got, expected, rtol=0,
                               atol=10 * np.finfo(dtype).eps * np.abs(expected).max())


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_input_not_modified(name, rng):
    case = make_case(name, 3, "first", "train", True, rng=rng)
    x_before = case.x.copy()
    w_before = case.kwargs["weight"].copy()
    nk_forward(case)
    np.testing.assert_array_equal(case.x, x_before)
    np.testing.assert_array_equal(case.kwargs["weight"], w_before)


@pytest.mark.parametrize("axis", [1, 2, -2, -1])
def test_batch_norm_any_axis(axis, rng):
    case = make_case("batch_norm", 4, "first", "train", True, rng=rng)
    x = rng.normal(size=(3, 4, 4, 4))
    case.x = x
    case.kwargs["axis"] = axis
    y, _ = nk_forward(case)
    assert_close_scaled(y, ref_forward(case)[0], np.float64)
