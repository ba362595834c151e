"""The engine over random views of every kernel path, against the formulas.

``tests/test_fuzz.py`` draws every public call over tiny shapes; this draws
the canonical view ``(P, A, K, J, B)`` itself.  Each kind of view the CPU
kernels take their own path for (:data:`KINDS`: rows, few long rows,
channels last, few wide rows, channels-first segments) is drawn in
float64, float32, float16 and bfloat16, with sizes at and around the
thresholds where the kernels change path (tiles, short segments, wide
groups, row pairs, column blocks, blocks of groups over every row, split
plans), centered or about zero, on one thread or two, now and then with
a NaN or an infinity in the data or with the mean far from zero, the
parameters in float64, in the input's dtype, or one or both missing.
Every example is compared with a float64 formula written plainly here
(forward, statistics, ``dx`` and the affine gradients), NaN and inf
exactly where it has them.  The examples are derandomized and their
number fixed, so CI runs the same ones everywhere.
"""

import os

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit
from conftest import view_formulas
from normkit import View
from normkit.backend import cpu, plan

ml_dtypes = pytest.importorskip("ml_dtypes")

#: Examples per kind of view and dtype (16 pairs); set
#: NORMKIT_FUZZ_EXAMPLES for a longer run, as for ``tests/test_fuzz.py``.
EXAMPLES = int(os.environ.get("NORMKIT_FUZZ_EXAMPLES", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def near(*thresholds):
    """Sizes at and on both sides of each threshold."""
    return st.sampled_from(sorted({n + d for n in thresholds
                                   for d in (-1, 0, 1) if n + d > 0}))


#: Most values per example: large enough for split plans, small enough to
#: keep the run short.
MOST_VALUES = 1 << 20

#: The shapes of view the kernels take different paths for, each as a
#: strategy for ``(P, A, K, J, B)``, sizes around the kernels' thresholds.
KINDS = {
    # rows (LayerNorm, RMSNorm): one group per row, row by row or, with
    # affine sums, two rows at a time (PAIRED_ROW_BYTES), tiles of TILE
    # values
    "rows": st.tuples(st.integers(1, 70), st.just(1), st.just(1),
                      near(cpu.TILE, cpu.PAIRED_ROW_BYTES // 2,
                           cpu.PAIRED_ROW_BYTES // 4), st.just(1)),
    # few long rows: the reduced extent split across items, the affine
    # sums by column blocks (COLUMN_BLOCK)
    "long rows": st.tuples(st.integers(1, 3), st.just(1), st.just(1),
                           near(plan.MIN_ITEM_ELEMENTS * 4,
                                cpu.COLUMN_BLOCK * 40), st.just(1)),
    # channels last (BatchNorm, GroupNorm): rows of K * J values reduced
    # across rows, in ROW_TILE tiles, split across items for one sample
    "channels last": st.tuples(st.integers(1, 3),
                               near(7, cpu.ROW_TILE // 8, 30000),
                               st.integers(1, 4),
                               near(1, 2, plan.WIDE_GROUP), st.just(1)),
    # few wide rows (BatchNorm1d, GroupNorm of one sample channels last):
    # rows of narrow or wide groups in blocks of groups that hold every
    # row (COLUMN_BLOCK_ROWS, MIN_COLUMN_RUN)
    "few wide rows": st.tuples(st.just(1),
                               near(2, plan.COLUMN_BLOCK_ROWS),
                               near(plan.MIN_COLUMN_RUN, 3000),
                               near(1, plan.WIDE_GROUP), st.just(1)),
    # channels first (BatchNorm, GroupNorm, InstanceNorm): segments of B
    # values, short ones (SHORT_TILE) gathered into tiles
    "segments": st.tuples(st.integers(1, 4), st.integers(1, 40),
                          st.integers(1, 9), st.integers(1, 3),
                          near(7, 49, cpu.SHORT_TILE // 2, cpu.TILE, 3136)),
}


@st.composite
def views(draw, kind):
    """A view of :data:`KINDS` ``kind``, at least two values per group and
    at most :data:`MOST_VALUES` values (the largest size redrawn small
    while the product is too large)."""
    dims = list(draw(KINDS[kind]))
    if dims[1] * dims[3] * dims[4] < 2:
        dims[3] = 2
    while np.prod(dims) > MOST_VALUES:
        dims[int(np.argmax(dims))] = draw(st.integers(2, 5))
    return View(*dims)


DTYPES = (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)

#: How the parameters reach the kernels: float64 (converted to the input's
#: compute dtype), in the input's own dtype (read as they are stored:
#: 16-bit ones converted block by block), or one or both missing (1 and 0).
PARAMETERS = ("float64", "input dtype", "weight only", "bias only", "none")

#: Error bound relative to ``max(1, max |expected|)`` per storage dtype.
TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 3e-4,
       np.dtype(np.float16): 2e-2, np.dtype(ml_dtypes.bfloat16): 3e-2}


def assert_matches(actual, expected, tol, what):
    """NaN and inf where ``expected`` has them; elsewhere within ``tol``
    times ``max(1, max |expected|)`` over the finite values."""
    actual = np.asarray(actual, np.float64).reshape(-1)
    expected = np.asarray(expected, np.float64).reshape(-1)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected),
                                  err_msg=f"{what}: NaN")
    np.testing.assert_array_equal(np.isinf(actual), np.isinf(expected),
                                  err_msg=f"{what}: inf")
    finite = np.isfinite(expected)
    if finite.any():
        scale = max(1.0, float(np.abs(expected[finite]).max()))
        error = float(np.abs(actual[finite] - expected[finite]).max())
        assert error <= tol * scale, f"{what}: error {error:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", sorted(KINDS))
@SETTINGS
@given(data=st.data(), centered=st.booleans(), threads=st.integers(1, 2),
       seed=st.integers(0, 2**32 - 1),
       special=st.sampled_from([None] * 4 + [np.nan, np.inf, -np.inf]),
       stable=st.booleans(), parameters=st.sampled_from(PARAMETERS))
def test_engine_matches_the_formulas(kind, dtype, data, centered, threads,
                                     seed, special, stable, parameters):
    view = data.draw(views(kind), label="view")
    rng = np.random.default_rng(seed)
    n = int(np.prod(view.dims))
    # the stability case (mean 1e4, spread 1) where the dtype can hold it
    loc = 1e4 if stable and np.dtype(dtype).itemsize > 2 else 3.0
    x = (loc + rng.standard_normal(n)).astype(dtype)
    if special is not None:
        x[rng.integers(n)] = special
    dy = rng.standard_normal(n).astype(dtype)
    weight = rng.uniform(0.5, 2.0, view.K * view.J).astype(np.float64)
    bias = rng.uniform(-1.0, 1.0, view.K * view.J)
    if parameters == "input dtype":
        weight, bias = weight.astype(dtype), bias.astype(dtype)
    passed_weight = None if parameters in ("bias only", "none") else weight
    passed_bias = None if parameters in ("weight only", "none") else bias
    eps = 1e-5
    numba.set_num_threads(threads)
    try:
        with np.errstate(all="ignore"):
            y, saved = normkit.normalize(x, view, passed_weight, passed_bias,
                                         eps, return_saved=True,
                                         centered=centered)
            dx, dweight, dbias = normkit.normalize_backward(dy, x, saved)
            expected = view_formulas(
                x, dy, view,
                np.ones(weight.size) if passed_weight is None
                else weight.astype(np.float64),
                np.zeros(bias.size) if passed_bias is None
                else bias.astype(np.float64), eps, centered)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    tol = TOL[np.dtype(dtype)]
    assert_matches(y, expected[0], tol, "y")
    # the statistics of groups without NaN or inf; without centering, the
    # mean square of every group (+inf with an infinity, NaN with a NaN)
    mean = np.ravel(saved.mean)
    with np.errstate(divide="ignore"):
        var = 1.0 / np.ravel(saved.rstd) ** 2 - eps
    var_tol = tol if np.dtype(dtype) == np.float64 else max(tol, 1e-3)
    finite = np.isfinite(expected[2].ravel())
    assert_matches(mean[finite], expected[1].ravel()[finite], tol, "mean")
    if centered:
        assert_matches(var[finite], expected[2].ravel()[finite], var_tol,
                       "var")
    else:
        assert_matches(var, expected[2], var_tol, "mean square")
    assert_matches(dx, expected[3], tol, "dx")
    # sums over A * B values each: bounded relative to the largest sum
    # (none without the parameter)
    if passed_weight is None:
        assert dweight is None
    else:
        assert_matches(dweight, expected[4], 10 * tol, "dweight")
    if passed_bias is None:
        assert dbias is None
    else:
        assert_matches(dbias, expected[5], 10 * tol, "dbias")
