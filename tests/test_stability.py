"""Numerical stability: large means, long reductions, NaN/Inf propagation and
shapes large enough to split the reduced extent across threads."""

import numpy as np
import pytest

import normkit
from conftest import view_formulas, with_nonfinite_groups
from normkit import reference as ref

AXES = [pytest.param(1, id="channels-first"), pytest.param(-1, id="channels-last")]


def offset_data(rng, shape, mean=1e4, std=1.0):
    """float32 data whose channels sit at ``mean`` with spread ``std``."""
    x = rng.normal(mean, std, size=shape)
    return x.astype(np.float32)


def channels_shape(base, axis):
    """``base`` is channels-first; move the channel dim for axis=-1."""
    if axis == 1:
        return base
    return (base[0],) + tuple(base[2:]) + (base[1],)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("base", [(64, 3, 4, 4), (4096, 3, 8, 8)], ids=["small", "long"])
def test_batch_norm_large_mean_float32(axis, base, rng):
    x = offset_data(rng, channels_shape(base, axis))
    y = normkit.batch_norm(x, training=True, axis=axis)
    expected = ref.batch_norm(x, training=True, axis=axis)[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("axis", AXES)
def test_batch_norm_large_mean_running_stats_float32(axis, rng):
    x = offset_data(rng, channels_shape((256, 3, 4, 4), axis))
    rm, rv = np.zeros(3), np.ones(3)
    normkit.batch_norm(x, rm, rv, training=True, momentum=1.0, axis=axis)
    _, erm, erv = ref.batch_norm(x, np.zeros(3), np.ones(3), training=True,
                                 momentum=1.0, axis=axis)
    np.testing.assert_allclose(rm, erm, rtol=1e-6)
    np.testing.assert_allclose(rv, erv, rtol=1e-3)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("first_offset", [0.0, 1e3], ids=["steady", "outlying-first"])
def test_moments_of_drifting_data_float32(first_offset, axis, rng):
    """Every tile of a group but its first is summed about the running mean
    (channels-last row tiles, channels-first segments): data whose level
    drifts (each sample of the batch at its own mean, far from 1e4, with a
    tiny spread) and a first sample far from the rest still give the
    float64 variance to float32 precision."""
    levels = 1e4 + rng.uniform(-5.0, 5.0, size=(512, 1, 1, 1))
    levels[0] += first_offset
    x = (levels + rng.normal(0.0, 0.01, size=(512, 4, 4, 16))).astype(np.float32)
    if axis == 1:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    view = normkit.engine.channel_view(x.shape, axis % x.ndim, per_sample=False)
    mean, var = normkit.engine.moments(x, view)
    wide = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, 16)
    np.testing.assert_allclose(mean[0], wide.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var[0], wide.var(axis=0), rtol=1e-5)


@pytest.mark.parametrize("head", [0.5, 3.0, 30.0, 1e3])
@pytest.mark.parametrize("width", [1024, 3000], ids=["one-tile", "three-tiles"])
def test_first_tile_center_float32(head, width, rng):
    """A group's first tile is summed about the mean of its first values
    (``cpu.CENTER_HEAD``), and again about its own mean when that center
    lies far from it (``cpu.MAX_SHIFT_SHARE``): rows at 1e4 whose first
    values sit ``head`` standard deviations away still give the float64
    variance to float32 precision (without the second sum, up to 1.5e-5
    apart at 30 and 1000), in the statistics alone and in the forward."""
    from normkit.backend import cpu
    x = rng.normal(1e4, 1.0, size=(256, width))
    x[:, :cpu.CENTER_HEAD] += head
    x = x.astype(np.float32)
    view = normkit.View(256, 1, 1, width, 1)
    mean, var = normkit.engine.moments(x, view)
    wide = x.astype(np.float64)
    std = wide.std(axis=1)
    # the mean's error measured in standard deviations of its row
    assert np.all(np.abs(mean[:, 0] - wide.mean(axis=1)) / std < 1e-6)
    np.testing.assert_allclose(var[:, 0], wide.var(axis=1), rtol=1e-6)
    _, fused_mean, fused_var, _ = normkit.engine.normalize_batch(x, view)
    assert np.all(np.abs(fused_mean - mean)[:, 0] / std < 1e-6)
    np.testing.assert_allclose(fused_var, var, rtol=1e-6)


@pytest.mark.parametrize("head", [0.5, 3.0, 30.0, 1e3])
@pytest.mark.parametrize("width", [64, 1024, 4096])
def test_first_row_tile_center_float32(head, width, rng):
    """The first tile of rows (BatchNorm over ``(N, C)``, channels last) is
    summed about the mean of its first ``cpu.ROW_STEP`` rows, and again
    about its own mean when some column's center lies far from it
    (``cpu.MAX_SHIFT_SHARE``): columns at 1e4 whose first rows sit
    ``head`` standard deviations away still give the float64 variance to
    float32 precision, in the statistics alone and in the forward."""
    from normkit.backend import cpu
    x = rng.normal(1e4, 1.0, size=(512, width))
    x[:cpu.ROW_STEP, ::3] += head
    x = x.astype(np.float32)
    view = normkit.engine.channel_view(x.shape, 1, per_sample=False)
    mean, var = normkit.engine.moments(x, view)
    wide = x.astype(np.float64)
    std = wide.std(axis=0)
    assert np.all(np.abs(mean[0] - wide.mean(axis=0)) / std < 1e-6)
    np.testing.assert_allclose(var[0], wide.var(axis=0), rtol=1e-6)
    _, fused_mean, fused_var, _ = normkit.engine.normalize_batch(x, view)
    np.testing.assert_array_equal(fused_mean, mean)
    np.testing.assert_array_equal(fused_var, var)


@pytest.mark.parametrize("shape", [(4, 64), (1, 200_000)], ids=["row", "long-row"])
def test_layer_norm_large_mean_float32(shape, rng):
    x = offset_data(rng, shape)
    y = normkit.layer_norm(x, shape[-1:])
    expected = ref.layer_norm(x, shape[-1:])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("axis", AXES)
def test_group_and_instance_norm_large_mean_float32(axis, rng):
    x = offset_data(rng, channels_shape((4, 4, 16, 16), axis))
    np.testing.assert_allclose(normkit.group_norm(x, 2, axis=axis),
                               ref.group_norm(x, 2, axis=axis), rtol=0, atol=1e-3)
    np.testing.assert_allclose(normkit.instance_norm(x, axis=axis),
                               ref.instance_norm(x, axis=axis)[0], rtol=0, atol=1e-3)


def assert_same_nonfinite(y, expected, atol):
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(y[finite], expected[finite], rtol=0, atol=atol)


NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_nonfinite(bad, axis, dtype, training, rng):
    x = rng.normal(size=channels_shape((4, 3, 5), axis)).astype(dtype)
    x[1, 2, 1] = bad  # valid index in both layouts
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    with np.errstate(all="ignore"):
        y = normkit.batch_norm(x, rm.copy(), rv.copy(), training=training, axis=axis)
        expected = ref.batch_norm(x, rm, rv, training=training, axis=axis)[0]
    assert_same_nonfinite(y, expected, 1e-4)


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "instance_norm",
                                  "batch_renorm", "rms_norm"])
def test_other_variants_nonfinite(bad, name, rng):
    x = rng.normal(size=(3, 4, 5))
    x[1, 2, 3] = bad
    calls = {
        "layer_norm": (lambda m, xx: m.layer_norm(xx, (4, 5))),
        "group_norm": (lambda m, xx: m.group_norm(xx, 2)),
        "instance_norm": (lambda m, xx: m.instance_norm(xx)),
        "batch_renorm": (lambda m, xx: m.batch_renorm(xx, np.zeros(4), np.ones(4),
                                                      training=True)),
        "rms_norm": (lambda m, xx: m.rms_norm(xx, (4, 5), eps=1e-5)),
    }
    with np.errstate(all="ignore"):
        y = calls[name](normkit, x)
        expected = calls[name](ref, x)
    if isinstance(expected, tuple):
        expected = expected[0]
    assert_same_nonfinite(y, expected, 1e-8)


@pytest.mark.parametrize("dims", [
    pytest.param((5, 1, 1, 40, 1), id="rows"),
    pytest.param((5, 1, 1, 100_000, 1), id="long-rows-split"),
    pytest.param((5, 30, 3, 1, 1), id="channels-last"),
    pytest.param((1, 100_000, 5, 1, 1), id="channels-last-split"),
    pytest.param((2, 4, 5, 1, 16), id="segments"),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16,
                                   "bfloat16"])
def test_mean_square_of_nonfinite_groups_is_plain(dims, dtype, rng):
    """Statistics about zero (RMSNorm) over groups holding infinities:
    the mean square is ``mean(x**2)``, +inf there (NaN only with a NaN),
    so such a group normalizes by ``rstd = 0``, to the bias except NaN at
    its infinities, as in the float64 reference and PyTorch; the
    backward then gives NaN over the group.  Every kernel path: fused
    rows, split rows, rows of channels, segments."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    view = normkit.View(*dims)
    x = with_nonfinite_groups(view, dtype, rng)
    dy = rng.normal(size=view.dims).astype(dtype)
    weight = rng.uniform(0.5, 2.0, size=view.K * view.J)
    bias = rng.normal(size=view.K * view.J)
    eps = 1e-5
    with np.errstate(all="ignore"):
        y_ref, _, groups, dx_ref, dweight_ref, _ = view_formulas(
            x, dy, view, weight, bias, eps, centered=False)
        _, var = normkit.engine.moments(x, view, centered=False)
        y, saved = normkit.normalize(x, view, weight, bias, eps,
                                     centered=False, return_saved=True)
        dx, dweight, _ = normkit.normalize_backward(dy, x, saved)
    assert np.isposinf(var[np.isposinf(groups)]).all()
    assert np.isnan(var[np.isnan(groups)]).all()
    finite = np.isfinite(groups)
    assert finite.sum() >= view.P * view.K // 5
    np.testing.assert_allclose(var[finite], groups[finite], rtol=1e-2)
    atol = 1e-8 if x.dtype == np.float64 else 3e-2
    assert_same_nonfinite(y.astype(np.float64), y_ref.reshape(x.shape), atol)
    assert_same_nonfinite(dx.astype(np.float64), dx_ref.reshape(x.shape), atol)
    np.testing.assert_array_equal(np.isnan(dweight), np.isnan(dweight_ref))


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_large_shape(axis, dtype, rng):
    x = rng.normal(2.0, 3.0, size=channels_shape((512, 3, 32, 32), axis)).astype(dtype)
    rm, rv = np.zeros(3), np.ones(3)
    w, b = rng.uniform(0.5, 2, size=3), rng.normal(size=3)
    y, saved = normkit.batch_norm(x, rm, rv, w, b, training=True, axis=axis,
                                  return_saved=True)
    ey, erm, erv = ref.batch_norm(x, np.zeros(3), np.ones(3), w, b, training=True,
                                  axis=axis)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(y, ey, rtol=0, atol=tol * np.abs(ey).max())
    np.testing.assert_allclose(rm, erm, rtol=tol)
    np.testing.assert_allclose(rv, erv, rtol=tol)
    dy = rng.normal(size=x.shape).astype(dtype)
    dx, dw, db = normkit.batch_norm_backward(dy, x, saved)
    edx, edw, edb = ref.batch_norm_backward(dy, x, None, None, w, b, training=True,
                                            axis=axis)
    np.testing.assert_allclose(dx, edx, rtol=0, atol=tol * np.abs(edx).max())
    np.testing.assert_allclose(dw, edw, rtol=0, atol=tol * 10 * np.abs(edw).max())
    np.testing.assert_allclose(db, edb, rtol=0, atol=tol * 10 * np.abs(edb).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_large_row(dtype, rng):
    x = rng.normal(-1.0, 4.0, size=(1, 300_000)).astype(dtype)
    w, b = rng.uniform(0.5, 2, size=300_000), rng.normal(size=300_000)
    y, saved = normkit.layer_norm(x, (300_000,), w, b, return_saved=True)
    ey = ref.layer_norm(x, (300_000,), w, b)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(y, ey, rtol=0, atol=tol * np.abs(ey).max())
    dy = rng.normal(size=x.shape).astype(dtype)
    dx, _, _ = normkit.layer_norm_backward(dy, x, saved)
    edx = ref.layer_norm_backward(dy, x, (300_000,), w, b)[0]
    np.testing.assert_allclose(dx, edx, rtol=0, atol=tol * np.abs(edx).max())
