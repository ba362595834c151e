"""The backend protocol and the extension API, on the CPU backend: partials
merge like one array, backward sums and dx from sums equal the fused
backward, channelwise arithmetic, the base classes' checks and state."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import normkit
from normkit import engine
from normkit.backend import plan
from normkit.schemes import Saved, update_running
from normkit.view import channel_view, trailing_view

VIEWS = {
    "bn-first": lambda: ((6, 3, 10), channel_view((6, 3, 10), 1, False)),
    "bn-last": lambda: ((6, 10, 3), channel_view((6, 10, 3), 2, False)),
    "gn": lambda: ((4, 6, 5), channel_view((4, 6, 5), 1, True, 2)),
    "ln": lambda: ((5, 40), trailing_view((5, 40), 1)),
    # few wide rows: the backward sums take every row of a chunk of
    # columns (the plan of normkit.backend.plan.column_sums)
    "ln-wide": lambda: ((2, 40000), trailing_view((2, 40000), 1)),
}


@pytest.mark.parametrize("axis", [1, 2], ids=["first", "last"])
def test_partials_of_two_halves_merge_to_the_whole(axis, rng):
    """Two processes' partials, concatenated, merge like one batch's."""
    x = rng.normal(100.0, 0.5, size=(6, 3, 10) if axis == 1 else (6, 10, 3))
    parts = [engine.moment_partials(half, channel_view(half.shape, axis, False))
             for half in (x[:2], x[2:])]
    mean, var = engine.merge_partials(np.concatenate(parts, axis=1))
    axes = tuple(a for a in range(x.ndim) if a != axis)
    np.testing.assert_allclose(mean[0], x.mean(axis=axes), rtol=1e-13)
    np.testing.assert_allclose(var[0], x.var(axis=axes), rtol=1e-9)


@pytest.mark.parametrize("name", VIEWS)
def test_partials_hold_counts_means_and_m2(name, rng):
    shape, view = VIEWS[name]()
    x = rng.standard_normal(shape)
    part = engine.moment_partials(x, view)
    assert part.shape[0] == view.P and part.shape[2:] == (view.K, 3)
    np.testing.assert_array_equal(part[..., 0].sum(axis=1), view.group_size)
    mean, var = engine.merge_partials(part)
    ref_mean, ref_var = engine.moments(x, view)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=1e-12)


@pytest.mark.parametrize("name", VIEWS)
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("with_gscale", [True, False])
def test_backward_sums_and_dx_from_sums_equal_the_fused_backward(
        name, centered, with_gscale, rng):
    shape, view = VIEWS[name]()
    x = rng.normal(1.0, 2.0, size=shape)
    dy = rng.standard_normal(shape)
    gscale = rng.uniform(0.5, 2.0, view.K * view.J) if with_gscale else None
    mean, var = engine.moments(x, view, centered)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    dx, sum_dy, sum_dy_xhat = engine.backward(dy, x, view, mean, rstd, gscale,
                                              centered=centered)
    group, affine = engine.backward_sums(dy, x, view, mean, rstd, gscale,
                                         centered)
    np.testing.assert_allclose(affine[0], sum_dy, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(affine[1], sum_dy_xhat, rtol=1e-10, atol=1e-12)
    dx2 = engine.dx_from_sums(dy, x, view, mean, rstd, gscale, group,
                              view.group_size, centered)
    np.testing.assert_allclose(dx2, dx, rtol=1e-10, atol=1e-12)
    # the group sums themselves, from their definition
    g = np.ones(view.K * view.J) if gscale is None else gscale
    x5 = x.reshape(view.dims)
    d5 = dy.reshape(view.dims)
    xhat = (x5 - (mean if centered else 0 * mean).reshape(view.P, 1, view.K, 1, 1)) \
        * rstd.reshape(view.P, 1, view.K, 1, 1)
    g5 = g.reshape(1, 1, view.K, view.J, 1)
    np.testing.assert_allclose(group[0], (g5 * d5).sum(axis=(1, 3, 4)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(group[1], (g5 * d5 * xhat).sum(axis=(1, 3, 4)),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", VIEWS)
def test_backward_sums_of_float32_input_are_float64_sums(name, rng):
    """Group and affine sums of float32 ``x``, ``dy`` and weights, from the
    fused backward and from ``backward_sums``, equal their float64
    definition to float64 rounding (relative to the sum of the terms'
    magnitudes): no product or partial sum is rounded to float32 on the
    way."""
    shape, view = VIEWS[name]()
    x = rng.normal(1.0, 2.0, size=shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gscale = rng.uniform(0.5, 2.0, view.K * view.J).astype(np.float32)
    mean, var = engine.moments(x, view)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    shape5 = (view.P, 1, view.K, 1, 1)
    d5 = dy.reshape(view.dims).astype(np.float64)
    dxhat = d5 * ((x.reshape(view.dims) - mean.reshape(shape5))
                  * rstd.reshape(shape5))
    g5 = gscale.astype(np.float64).reshape(1, 1, view.K, view.J, 1)
    want = {"group": [g5 * d5, g5 * dxhat], "affine": [d5, dxhat]}
    axes = {"group": (1, 3, 4), "affine": (0, 1, 4)}
    _, *fused_affine = engine.backward(dy, x, view, mean, rstd, gscale)
    group, affine = engine.backward_sums(dy, x, view, mean, rstd, gscale)
    for kind, got in (("group", group), ("affine", affine),
                      ("affine", fused_affine)):
        for value, terms in zip(got, want[kind]):
            exact = terms.sum(axis=axes[kind]).reshape(np.shape(value))
            scale = np.abs(terms).sum(axis=axes[kind]).reshape(exact.shape)
            assert np.all(np.abs(value - exact) <= 1e-13 * scale), kind


def test_the_rows_case_takes_the_fused_rows():
    """"ln" has whole rows of one group per item: the fused backward above
    runs the rows shortcut (``normkit.backend.cpu._rows_backward``), which
    the two-step route then checks."""
    _, view = VIEWS["ln"]()
    assert plan.make_plan(view).fused
    assert (view.A, view.K, view.B) == (1, 1, 1)


def _affine_case(name, rng):
    shape, view = VIEWS[name]()
    x = rng.normal(1.0, 2.0, size=shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gscale = rng.uniform(0.5, 2.0, view.K * view.J).astype(np.float32)
    mean, var = engine.moments(x, view)
    return x, dy, view, mean, 1.0 / np.sqrt(var + 1e-5), gscale


def _affine_sums(dy, x, view, mean, rstd):
    """``(sum dy, sum dy*xhat)`` per ``(k, j)`` in float64, from their
    definition."""
    shape5 = (view.P, 1, view.K, 1, 1)
    xhat = ((x.reshape(view.dims) - mean.reshape(shape5))
            * rstd.reshape(shape5))
    d5 = dy.reshape(view.dims).astype(np.float64)
    return (d5.sum(axis=(0, 1, 4)).reshape(-1),
            (d5 * xhat).sum(axis=(0, 1, 4)).reshape(-1))


def test_the_wide_case_takes_the_column_sums():
    shape, view = VIEWS["ln-wide"]()
    assert plan.column_sums(plan.reduction_plan(view, 2), view)
    assert not plan.affine_partials_fit(plan.make_plan(view, 2), view)


@pytest.mark.parametrize("name", VIEWS)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16",
                                   "bfloat16"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_backward_writes_the_affine_sums_into_affine_out(name, dtype,
                                                         batch_stats, rng):
    """``affine_out`` holds the float64 sums rounded once to its dtype
    (whichever path: written by the kernels over few wide rows, converted
    at the end elsewhere), and ``dx`` does not change."""
    dt = (pytest.importorskip("ml_dtypes").bfloat16 if dtype == "bfloat16"
          else np.dtype(dtype))
    x, dy, view, mean, rstd, gscale = _affine_case(name, rng)
    dx, sum_dy, sum_dy_xhat = engine.backward(dy, x, view, mean, rstd, gscale,
                                              batch_stats)
    sum_dy, sum_dy_xhat = _affine_sums(dy, x, view, mean, rstd)
    kj = view.K * view.J
    out = (np.full(kj, np.nan, dt), np.full((1, kj), np.nan, dt))
    dx2, got_dy, got_dyx = engine.backward(dy, x, view, mean, rstd, gscale,
                                           batch_stats, affine_out=out)
    assert got_dy is out[0] and got_dyx is out[1]
    np.testing.assert_allclose(dx2, dx, rtol=1e-6, atol=1e-7)
    # one rounding to the output's dtype, on sums of float32 input
    rtol = {"bfloat16": 2 ** -8, "float16": 2 ** -11}.get(dtype, 1e-6)
    for got, want in ((got_dy, sum_dy), (got_dyx, sum_dy_xhat)):
        np.testing.assert_allclose(got.reshape(-1).astype(np.float64), want,
                                   rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("name", ["ln", "ln-wide"])
def test_affine_out_not_contiguous_or_of_two_dtypes_is_filled_too(name, rng):
    x, dy, view, mean, rstd, gscale = _affine_case(name, rng)
    sum_dy, sum_dy_xhat = _affine_sums(dy, x, view, mean, rstd)
    kj = view.K * view.J
    strided = np.zeros(2 * kj, np.float32)[::2]
    other = np.zeros(kj, np.float64)
    _, got_dy, got_dyx = engine.backward(dy, x, view, mean, rstd, gscale,
                                         affine_out=(strided, other))
    assert got_dy is strided and got_dyx is other
    np.testing.assert_allclose(strided, sum_dy, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(other, sum_dy_xhat, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad, error, words", [
    (lambda kj: (np.zeros(kj),), TypeError, "pair of arrays"),
    (lambda kj: (np.zeros(kj), np.zeros(kj + 1)), ValueError,
     "affine_out[1] must hold K * J"),
    (lambda kj: (np.zeros(kj, np.int32), np.zeros(kj)), TypeError,
     "affine_out[0] must have dtype"),
    (lambda kj: (np.zeros(kj), np.broadcast_to(np.zeros(1), (kj,))),
     ValueError, "affine_out[1] is written and must be writeable"),
])
def test_bad_affine_out_raises_before_anything_is_written(bad, error, words,
                                                          rng):
    x, dy, view, mean, rstd, gscale = _affine_case("ln", rng)
    dx_out = np.full_like(x, 7.0)
    with pytest.raises(error, match=re.escape(words)):
        engine.backward(dy, x, view, mean, rstd, gscale, out=dx_out,
                        affine_out=bad(view.K * view.J))
    assert np.all(dx_out == 7.0)


def test_affine_out_without_need_affine_raises(rng):
    x, dy, view, mean, rstd, gscale = _affine_case("ln", rng)
    kj = view.K * view.J
    with pytest.raises(ValueError, match="need_affine is False"):
        engine.backward(dy, x, view, mean, rstd, gscale, need_affine=False,
                        affine_out=(np.zeros(kj), np.zeros(kj)))


def test_dx_from_sums_with_fixed_statistics_is_the_scaled_gradient(rng):
    x = rng.standard_normal((4, 3, 5))
    dy = rng.standard_normal(x.shape)
    view = channel_view(x.shape, 1, False)
    rstd = np.full((1, 3), 2.0)
    zeros = (np.zeros((1, 3)), np.zeros((1, 3)))
    dx = engine.dx_from_sums(dy, x, view, np.zeros((1, 3)), rstd, None, zeros,
                             np.inf)
    np.testing.assert_allclose(dx, 2.0 * dy)


@normkit.channelwise(outputs=3)
def _floored(mean, var, floor, shift):
    # a variance floor and a shifted center; the factor again, third
    factor = 1.0 / max(var, floor) ** 0.5
    return mean - shift, factor, factor


#: Views of normalize_transformed: a fused plan in each of the fused
#: kernel's paths, and (bn-last-wide) a plan that splits the groups
TRANSFORM_VIEWS = {
    **{name: VIEWS[name] for name in ("bn-first", "gn", "ln", "ln-wide")},
    "gn-last": lambda: ((4, 30, 6), channel_view((4, 30, 6), 2, True, 3)),
    "bn-last-wide": lambda: ((64, 200, 8), channel_view((64, 200, 8), 2,
                                                         False)),
}


def _reference_transformed(x, view, floor, shift, gamma, beta):
    """normalize_transformed with _floored, in float64 from the formulas."""
    x64 = x.astype(np.float64).reshape(view.dims)
    mean = x64.mean(axis=(1, 3, 4))
    var = x64.var(axis=(1, 3, 4))
    center, factor, _ = (np.vectorize(_floored.function)(
        mean, var, floor, np.reshape(shift, mean.shape)))
    groups = (view.P, 1, view.K, 1, 1)
    y = (x64 - center.reshape(groups)) * factor.reshape(groups)
    y = (y * gamma.astype(np.float64).reshape(1, 1, view.K, view.J, 1)
         + beta.astype(np.float64).reshape(1, 1, view.K, view.J, 1))
    return y.reshape(x.shape), mean, var, center, factor


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", TRANSFORM_VIEWS)
def test_normalize_transformed_follows_the_formula(name, dtype, rng):
    shape, view = TRANSFORM_VIEWS[name]()
    assert plan.make_plan(view).fused == (name != "bn-last-wide")
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    x.reshape(view.dims)[..., :1, :, :] *= 0.1   # some groups below the floor
    gamma = rng.normal(1.0, 0.5, view.K * view.J).astype(dtype)
    beta = rng.normal(0.0, 0.5, view.K * view.J).astype(dtype)
    shift = rng.normal(0.0, 1.0, view.P * view.K)     # one per group
    y, mean, var, (center, factor, again) = engine.normalize_transformed(
        x, view, _floored, (1.0, shift), gamma, beta)
    want_y, want_mean, want_var, want_center, want_factor = (
        _reference_transformed(x, view, 1.0, shift, gamma, beta))
    assert y.dtype == dtype and y.shape == shape
    assert all(a.shape == (view.P, view.K) and a.dtype == np.float64
               for a in (mean, var, center, factor, again))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-5)
    # the outputs are the transform of the statistics returned, exactly
    np.testing.assert_array_equal(
        center, mean - shift.reshape(view.P, view.K))
    np.testing.assert_array_equal(factor, 1 / np.sqrt(np.maximum(var, 1.0)))
    np.testing.assert_array_equal(again, factor)
    tol = {np.float16: 4e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(y.astype(np.float64), want_y, rtol=tol,
                               atol=tol * np.abs(want_y).max())
    in_place = x.copy()   # out=x: the statistics come first (the last bit
    engine.normalize_transformed(     # may differ, see the Backend protocol)
        in_place, view, _floored, (1.0, shift), gamma, beta, out=in_place)
    np.testing.assert_allclose(in_place.astype(np.float64), y, rtol=tol,
                               atol=tol * np.abs(want_y).max())


@pytest.mark.parametrize("name", TRANSFORM_VIEWS)
def test_normalize_transformed_by_the_own_statistics_is_normalize_batch(
        name, rng):
    # no floor, no shift: (mean, 1 / sqrt(var)), normalize_batch's with
    # eps = 0; the same code, compiled into another kernel (LLVM may
    # order a float32 tile's sums otherwise)
    shape, view = TRANSFORM_VIEWS[name]()
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    gamma = rng.normal(1.0, 0.5, view.K * view.J).astype(np.float32)
    y, mean, var, rstd = engine.normalize_batch(x, view, gamma, None, 0.0)
    got, got_mean, got_var, (center, factor, _) = engine.normalize_transformed(
        x, view, _floored, (0.0, 0.0), gamma)
    np.testing.assert_allclose(got, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_var, var, rtol=1e-6)
    np.testing.assert_array_equal(center, got_mean)
    np.testing.assert_allclose(factor, rstd, rtol=1e-6)


def test_a_closure_transform_compiles_in_memory(rng):
    # a closure's captured values are compiled in: its fused kernel is
    # built from source in memory, not from a file of the loop directory
    floor = 5.0

    @normkit.channelwise(outputs=2)
    def floored(mean, var):
        return mean, 1.0 / max(var, floor) ** 0.5
    shape, view = VIEWS["ln"]()
    x = rng.normal(3.0, 2.0, shape)
    y, mean, var, (center, factor) = engine.normalize_transformed(
        x, view, floored)
    np.testing.assert_array_equal(factor, 1 / np.sqrt(np.maximum(var, floor)))
    np.testing.assert_allclose(y, (x - center) * factor, rtol=1e-12)


@normkit.channelwise
def _one_output(mean, var):
    return mean


@pytest.mark.parametrize("transform, args, error, words", [
    (_floored.function, (1.0, 0.0), TypeError, "must be a channelwise"),
    (_one_output, (), ValueError, "at least two values"),
    (_floored, (1.0,), TypeError, "2 more arguments, got 1"),
    (_floored, (1.0, np.zeros(5)), ValueError, "args[1] must be a number or "
                                               "hold one value per group"),
    (_floored, (1.0, [0.0] * 3), TypeError, "args[1] must be a NumPy array"),
])
def test_normalize_transformed_checks_before_writing(transform, args, error,
                                                     words, rng):
    shape, view = VIEWS["bn-first"]()
    x = rng.standard_normal(shape)
    out = np.full(shape, 7.0)
    with pytest.raises(error, match=re.escape(words)):
        engine.normalize_transformed(x, view, transform, args, out=out)
    assert (out == 7.0).all()


@normkit.channelwise(outputs=2)
def _sum_and_difference(a, b):
    return a + b, a - b


def test_channelwise_call_and_out_in_place(rng):
    a, b = rng.standard_normal(5), rng.standard_normal(5)
    total, diff = _sum_and_difference(a, b)
    np.testing.assert_allclose(total, a + b)
    np.testing.assert_allclose(diff, a - b)
    out = np.zeros((1, 5), np.float32)
    _sum_and_difference(a, 1.5, out=(out, b))          # b updated in place
    np.testing.assert_allclose(out[0], a + 1.5, rtol=1e-6)
    np.testing.assert_allclose(b, a - 1.5)


def test_channelwise_out_strided_or_overlapping_an_input(rng):
    a, b = rng.standard_normal(5), rng.standard_normal(5)
    columns = np.zeros((5, 2))
    _sum_and_difference(a, b, out=(columns[:, 0], columns[:, 1]))
    np.testing.assert_array_equal(columns, np.stack([a + b, a - b], axis=1))
    # an output one element ahead of an input reads the input as it was
    buffer = rng.standard_normal(6)
    before = buffer.copy()
    other = np.zeros(5)
    _sum_and_difference(buffer[:5], 1.0, out=(buffer[1:], other))
    np.testing.assert_array_equal(buffer[1:], before[:5] + 1.0)
    np.testing.assert_array_equal(other, before[:5] - 1.0)
    # a float32 output gets the float64 result rounded as NumPy rounds it
    single = np.zeros(5, np.float32)
    _sum_and_difference(a, b, out=(single, other))
    np.testing.assert_array_equal(single, (a + b).astype(np.float32))


def test_channelwise_reads_float32_arrays_in_float64(rng):
    """float32 arguments (running statistics) reach the loop as they are,
    each value widened to float64 there: the results are those of their
    float64 copies, bit for bit, also when an output is an input."""
    a = rng.standard_normal(7).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)[::-1]   # strided
    wide = [a.astype(np.float64), b.astype(np.float64)]
    for got, want in zip(_sum_and_difference(a, b),
                         _sum_and_difference(*wide)):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    total = _sum_and_difference(a, b)[0]
    _sum_and_difference(a, b, out=(a, np.empty(7)))
    np.testing.assert_array_equal(a, total.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_channelwise_reads_and_writes_16_bit_arrays_in_place(dtype, rng):
    """16-bit arguments (running statistics kept in float16 or bfloat16)
    are read in their storage and written in place, each float64 result
    rounded once as NumPy's cast rounds it."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    a = rng.standard_normal(9).astype(dtype)
    b = (rng.standard_normal(9) * 1e-3).astype(dtype)
    wide = [a.astype(np.float64), b.astype(np.float64)]
    total, diff = _sum_and_difference(*wide)
    for got, want in zip(_sum_and_difference(a, b), (total, diff)):
        np.testing.assert_array_equal(got, want)
    same = a
    _sum_and_difference(a, b, out=(a, b))
    assert a is same
    np.testing.assert_array_equal(a.view(np.uint16),
                                  total.astype(dtype).view(np.uint16))
    np.testing.assert_array_equal(b.view(np.uint16),
                                  diff.astype(dtype).view(np.uint16))


def test_channelwise_reads_two_dimensional_arguments_flat(rng):
    """``(P, K)`` arguments (a forward's statistics) are read in memory
    order, whatever their layout and float dtype, also where an output
    is the same memory as an input."""
    rows = rng.standard_normal((2, 4))
    for a in (rows, rows.T.copy().T, rows[:, ::-1], rows.astype(np.float32)):
        want = a.astype(np.float64).reshape(-1)
        total, diff = _sum_and_difference(a, 2.0)
        np.testing.assert_array_equal(total, want + 2.0)
        np.testing.assert_array_equal(diff, want - 2.0)
    alias = rows.copy()
    _sum_and_difference(alias, 1.0, out=(alias.reshape(-1), np.empty(8)))
    np.testing.assert_array_equal(alias, rows + 1.0)


def test_channelwise_checks_its_arguments():
    with pytest.raises(TypeError, match="expected 2 arguments"):
        _sum_and_difference(np.ones(3))
    with pytest.raises(ValueError, match="one size"):
        _sum_and_difference(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match="array"):
        _sum_and_difference(1.0, 2.0)


_CACHED_LOOP_SCRIPT = """
import numpy as np
from normkit.backend.protocol import merge_summaries
n, mean, m2 = merge_summaries(2.0, np.array([1.0, 3.0]), np.zeros(2),
                              2.0, np.array([3.0, 5.0]), np.zeros(2))
loop = merge_summaries.compiled[("cpu", (True, False, False) * 2)]
print(sum(loop.stats.cache_hits.values()), mean.tolist(), m2.tolist())
"""


def _run_twice(script, cache):
    """``script``'s output in two processes with Numba's cache in
    ``cache``, each split into its first word and the rest."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    return [subprocess.run([sys.executable, "-c", script], env=env,
                           capture_output=True, text=True,
                           check=True).stdout.split(maxsplit=1)
            for _ in range(2)]


def test_a_multi_output_loop_is_compiled_once_and_then_loaded(tmp_path):
    # the generated loop's source goes to a file, so Numba caches its
    # machine code: a second process loads it (no 0.15 s compilation)
    runs = _run_twice(_CACHED_LOOP_SCRIPT, tmp_path)
    assert [hits for hits, _ in runs] == ["0", "1"]
    assert runs[0][1] == runs[1][1] == "[2.0, 4.0] [4.0, 4.0]\n"
    assert len(list((tmp_path / "normkit-loops").glob("normkit_loop_*.py"))) == 1


_CACHED_TRANSFORM_SCRIPT = """
import numpy as np
from normkit import engine
from normkit.schemes.batch import renormalization
x = np.arange(12.0).reshape(3, 4)
y, mean, var, results = engine.normalize_transformed(
    x, engine.trailing_view(x.shape, 1), renormalization,
    (np.zeros(3), np.ones(3), 0.0, 1.0, 0.0))     # r = 1, d = 0: plain
kernel = renormalization.compiled["cpu-transformed"]
print(sum(kernel.stats.cache_hits.values()), y.round(4).tolist())
"""


def test_a_transformed_kernel_is_compiled_once_and_then_loaded(tmp_path):
    # the fused kernel of normalize_transformed is generated like the
    # loops: a second process loads it from disk
    runs = _run_twice(_CACHED_TRANSFORM_SCRIPT, tmp_path)
    assert [hits for hits, _ in runs] == ["0", "1"]
    row = [-1.3416, -0.4472, 0.4472, 1.3416]
    assert runs[0][1] == runs[1][1] == f"{[row] * 3}\n"
    assert len(list((tmp_path / "normkit-loops").glob("normkit_loop_*.py"))) == 1


def _scaled_pair(factor):
    @normkit.channelwise(outputs=2)
    def pair(a):
        return a * factor, -a
    return pair


def test_closures_and_an_unwritable_cache_compile_in_memory(tmp_path,
                                                            monkeypatch):
    # a closure's captured values are compiled in: two closures of one
    # source must not share a cached loop
    a = np.arange(3.0)
    np.testing.assert_array_equal(_scaled_pair(2.0)(a)[0], 2.0 * a)
    np.testing.assert_array_equal(_scaled_pair(3.0)(a)[0], 3.0 * a)
    blocked = tmp_path / "a file, not a directory"
    blocked.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocked))

    @normkit.channelwise(outputs=2)
    def fresh(a, b):
        return a * b, a + b
    product, total = fresh(a, 2.0)
    np.testing.assert_array_equal(product, 2.0 * a)
    np.testing.assert_array_equal(total, a + 2.0)


@normkit.channelwise
def _affine_tlu(y, gain, shift, floor):
    return max(y * gain + shift, floor)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_channelwise_over_broadcasts_per_channel_and_per_group(dtype, rng):
    x = rng.standard_normal((3, 4, 5)).astype(dtype)            # (N, C, S)
    view = channel_view(x.shape, 1, per_sample=True)           # P=3, K=4
    gain = rng.uniform(0.5, 2.0, 4)                             # per channel
    shift = rng.standard_normal((3, 4))                         # per group
    y = _affine_tlu.over(view, x, gain, shift, -0.25)
    expected = np.maximum(x.astype(np.float64) * gain[None, :, None]
                          + shift[:, :, None], -0.25)
    assert y.dtype == dtype and y.shape == x.shape
    tol = {np.float16: 2e-3, np.float32: 1e-6, np.float64: 1e-14}[dtype]
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)


def test_channelwise_over_rejects_arguments_that_fit_nothing():
    view = normkit.View(2, 1, 3, 1, 4)
    with pytest.raises(ValueError, match="fits neither"):
        _affine_tlu.over(view, np.ones(24), np.ones(5), 0.0, 0.0)
    with pytest.raises(ValueError, match="input"):
        _affine_tlu.over(view, np.ones(3), np.ones(3), 0.0, 0.0)


def test_update_running_averages_rows_with_the_unbiased_factor():
    running = np.array([1.0, 2.0])
    update_running(running, np.array([[2.0, 4.0], [4.0, 8.0]]), 0.25, n=5)
    np.testing.assert_allclose(running, 0.75 * np.array([1.0, 2.0])
                               + 0.25 * 1.25 * np.array([3.0, 6.0]))


class _MeanOnly(normkit.RunningStatsNormalizer):
    """A running-statistics scheme with an extra state entry."""

    state_names = normkit.RunningStatsNormalizer.state_names + ("scale",)

    def __init__(self, num_features):
        super().__init__(num_features, affine=False)
        self.scale = np.ones(num_features)

    def _forward(self, x):
        view = channel_view(x.shape, 1, False)
        mean, var = engine.moments(x, view)
        if self.training:
            self.update_running_stats(mean, var, view.group_size)
        return normkit.normalize_with_statistics(x, view, mean, self.scale,
                                                 variant=self.label)


def test_state_names_of_a_subclass_are_kept_and_counted(rng):
    layer = _MeanOnly(3)
    x = rng.normal(2.0, 1.0, (8, 3))
    layer(x)
    assert set(layer.state_dict()) == {"running_mean", "running_var",
                                       "num_batches_tracked", "scale"}
    np.testing.assert_allclose(layer.running_mean, 0.1 * x.mean(axis=0))
    np.testing.assert_allclose(layer.running_var,
                               0.9 + 0.1 * x.var(axis=0, ddof=1))
    assert layer.num_batches_tracked == 1


@pytest.mark.parametrize("bad", [[1.0, 2.0], np.ones((2, 2), np.int64),
                                 np.ones((3, 3))], ids=["list", "int", "shape"])
def test_backward_checks_dy_once_and_keeps_grads(bad, rng):
    layer = normkit.GroupNorm(2, 4)
    x = rng.standard_normal((2, 4, 3))
    layer.backward(np.ones_like(layer(x)))
    grads = dict(layer.grads)
    with pytest.raises((TypeError, ValueError), match="dy"):
        layer.backward(bad)
    assert layer.grads == grads


def test_saved_records_carry_a_scheme_s_extras():
    view = normkit.View(1, 2, 1, 1, 1)
    saved = Saved("mine", view, (2, 1), np.zeros((1, 1)), np.ones((1, 1)),
                  True, None, False, extras={"tau": np.zeros(1)})
    assert saved.replace(variant="other").extras["tau"].shape == (1,)


def test_saved_init_takes_every_field_with_its_default():
    # Saved writes its own __init__ (for speed): its parameters must be the
    # dataclass's fields, in order, with the same defaults.
    import dataclasses
    import inspect
    parameters = list(inspect.signature(Saved).parameters.values())
    fields = dataclasses.fields(Saved)
    assert [p.name for p in parameters] == [f.name for f in fields]
    for p, f in zip(parameters, fields):
        if f.default_factory is not dataclasses.MISSING:
            assert p.default is None   # None stands for a new default
        elif f.default is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty, f.name
        else:
            assert p.default == f.default, f.name
    view = normkit.View(1, 2, 1, 1, 1)
    a = Saved("v", view, (2, 1), np.zeros((1, 1)), np.ones((1, 1)), True,
              None, False)
    b = Saved("v", view, (2, 1), a.mean, a.rstd, True, None, False)
    assert a.extras == {} and a.extras is not b.extras
    assert (a.r, a.d, a.centered, a.var, a.gradients, a.bias_shape) == (
        None, None, True, None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.variant = "w"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_engine_rejects_non_float_input(dtype):
    x = np.ones((2, 3), dtype)
    view = trailing_view(x.shape, 1)
    with pytest.raises(TypeError, match="dtype"):
        engine.moments(x, view)
    with pytest.raises(TypeError, match="dtype"):
        engine.apply_affine(x, view, np.zeros(2), np.ones(2))
