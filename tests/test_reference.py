"""The float64 reference checked against itself: analytic backward vs finite
differences of the reference forward, plus basic contract checks.

Runs without the engine (only ``normkit.reference`` is imported).
"""

import numpy as np
import pytest

from conftest import (LAYOUTS, VARIANT_NAMES, VARIANTS, make_case,
                      numerical_grad, ref_backward, ref_forward)
from normkit import reference as ref

# batch_renorm treats r and d as constants in the backward, so finite
# differences only agree where both are locally constant: either clipped
# everywhere ("saturated") or pinned by rmax=1, dmax=0 ("pinned").
SATURATED_RENORM = dict(running_mean=np.array([100.0, -1000.0, -100.0, 1000.0]),
                        running_std=np.array([0.01, 100.0, 0.01, 100.0]))
PINNED_RENORM = dict(rmax=1.0, dmax=0.0)


def fd_cases():
    params = []
    for name in VARIANT_NAMES:
        v = VARIANTS[name]
        for ndim in (2, 3, 4):
            for layout in LAYOUTS:
                for mode in v.modes():
                    if mode == "train" and ndim < v.min_train_ndim:
                        continue
                    for affine in (True, False):
                        extras = [("", {})]
                        if name == "batch_renorm" and mode == "train":
                            extras = [("saturated", SATURATED_RENORM),
                                      ("pinned", PINNED_RENORM)]
                        for tag, extra in extras:
                            pid = f"{name}-{ndim}d-{layout}-{mode}-{affine}-{tag}"
                            params.append(pytest.param(name, ndim, layout, mode,
                                                       affine, extra, id=pid))
    return params


@pytest.mark.parametrize("name,ndim,layout,mode,affine,extra", fd_cases())
def test_backward_matches_finite_differences(name, ndim, layout, mode, affine,
                                             extra, rng):
    case = make_case(name, ndim, layout, mode, affine, rng=rng, **extra)
    y, _ = ref_forward(case)
    dy = rng.normal(size=y.shape)

    def loss(**kw):
        x = kw.pop("x", case.x)
        return float(np.sum(ref_forward(case, x=x, **kw)[0] * dy))

    dx, dw, db = ref_backward(case, dy)
    scale = max(1.0, np.max(np.abs(dx)))
    np.testing.assert_allclose(dx, numerical_grad(lambda a: loss(x=a), case.x),
                               rtol=0, atol=1e-6 * scale)
    if affine:
        w, b = case.kwargs["weight"], case.kwargs["bias"]
        np.testing.assert_allclose(
            dw, numerical_grad(lambda a: loss(weight=a), w), rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(
            db, numerical_grad(lambda a: loss(bias=a), b), rtol=0, atol=1e-6 * scale)
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float64_output_and_inputs_untouched(name, dtype, rng):
    case = make_case(name, 4, "first", "train", True, dtype=dtype, rng=rng)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v)
              for k, v in case.kwargs.items()}
    x_before = case.x.copy()
    y, stats = ref_forward(case)
    dx, dw, db = ref_backward(case, np.ones(y.shape, dtype=dtype))
    for arr in [y, dx, dw, db, *stats.values()]:
        assert arr.dtype == np.float64
    np.testing.assert_array_equal(case.x, x_before)
    assert case.x.dtype == dtype
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(case.kwargs[k], v)


def test_batch_norm_small_example():
    x = np.array([[1.0, 10.0], [3.0, 30.0]])  # (N=2, C=2)
    y, rm, rv = ref.batch_norm(x, np.zeros(2), np.ones(2), training=True,
                               momentum=0.5, eps=0.0)
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(rm, [1.0, 10.0])          # 0.5 * [2, 20]
    np.testing.assert_allclose(rv, [0.5 + 1.0, 0.5 + 100.0])  # unbiased 2, 200


def test_cumulative_momentum_is_plain_average(rng):
    rm, rv = np.zeros(3), np.ones(3)
    batches = [rng.normal(size=(5, 3)) for _ in range(4)]
    for k, b in enumerate(batches):
        _, rm, rv = ref.batch_norm(b, rm, rv, training=True, momentum=None,
                                   num_batches_tracked=k)
    allx = np.stack(batches)
    np.testing.assert_allclose(rm, allx.mean(axis=1).mean(axis=0))
    np.testing.assert_allclose(rv, allx.var(axis=1, ddof=1).mean(axis=0))


def test_channels_last_equals_transposed_channels_first(rng):
    x = rng.normal(size=(3, 4, 5, 2))
    w, b = rng.normal(size=4), rng.normal(size=4)
    first = ref.batch_norm(x, weight=w, bias=b, training=True)[0]
    last = ref.batch_norm(np.moveaxis(x, 1, -1), weight=w, bias=b,
                          training=True, axis=-1)[0]
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), first)


def test_batch_renorm_inference_has_no_eps(rng):
    x = rng.normal(size=(4, 3))
    rm, rs = rng.normal(size=3), np.full(3, 1e-3)
    y, nrm, nrs = ref.batch_renorm(x, rm, rs, training=False, eps=1.0)
    np.testing.assert_allclose(y, (x - rm) / rs)
    np.testing.assert_array_equal(nrm, rm)
    np.testing.assert_array_equal(nrs, rs)


@pytest.mark.parametrize("bad", [dict(num_groups=3), dict(axis=5)])
def test_group_norm_rejects_bad_arguments(bad, rng):
    kw = dict(num_groups=2, axis=1)
    kw.update(bad)
    with pytest.raises(ValueError):
        ref.group_norm(rng.normal(size=(2, 4, 3)), **kw)
