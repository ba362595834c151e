"""Property-based tests (hypothesis) of the engine's normalizations."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normkit

SETTINGS = settings(max_examples=25, deadline=None)

#: batch_norm refuses eps <= 0 with batch statistics, as PyTorch 2.13 does;
#: this eps changes no float64 result of these tests.
TINY_EPS = 1e-300

seeds = st.integers(0, 2**32 - 1)
ndims = st.integers(2, 5)
layouts = st.sampled_from([1, -1])
channels = st.sampled_from([2, 4, 6])
scales = st.floats(0.1, 10.0)
shifts = st.floats(-1e3, 1e3)


@st.composite
def inputs(draw, min_ndim=2, min_spatial=1):
    """(x, axis): random data with a random shape and channel axis."""
    ndim = draw(st.integers(max(2, min_ndim), 5))
    axis = draw(layouts)
    c = draw(channels)
    n = draw(st.integers(2, 4))
    spatial = [draw(st.integers(1, 4)) for _ in range(ndim - 2)]
    if ndim > 2 and np.prod(spatial) < min_spatial:
        spatial[0] = min_spatial
    shape = [n] + spatial
    shape.insert(1 if axis == 1 else len(shape), c)
    r = np.random.default_rng(draw(seeds))
    x = r.normal(draw(shifts), draw(scales), size=shape)
    x = x + r.normal(0, 1, size=shape[axis] if axis == -1 else (c,) + (1,) * (ndim - 2))
    return x, axis


def groups(y, axis, per_sample, num_groups=None):
    """Rows of ``y`` as statistics groups.

    per_sample=False: one row per channel (batch statistics);
    per_sample=True: one row per (sample, channel group)."""
    moved = np.moveaxis(y, axis, 1)
    n, c = moved.shape[:2]
    if not per_sample:
        return np.moveaxis(moved, 1, 0).reshape(c, -1)
    g = c if num_groups is None else num_groups
    return moved.reshape(n * g, -1)


def assert_standardized(rows, atol=1e-6):
    np.testing.assert_allclose(rows.mean(axis=1), 0.0, atol=atol)
    np.testing.assert_allclose(rows.var(axis=1), 1.0, atol=atol)


@SETTINGS
@given(inputs())
def test_batch_norm_standardizes_channels(data):
    x, axis = data
    y = normkit.batch_norm(x, training=True, eps=TINY_EPS, axis=axis)
    assert_standardized(groups(y, axis, per_sample=False))


@SETTINGS
@given(inputs(min_ndim=3, min_spatial=2))
def test_instance_norm_standardizes_instances(data):
    x, axis = data
    y = normkit.instance_norm(x, eps=0.0, axis=axis)
    assert_standardized(groups(y, axis, per_sample=True))


@SETTINGS
@given(inputs(), st.integers(1, 3))
def test_layer_norm_standardizes_rows(data, k):
    x, _ = data
    k = min(k, x.ndim - 1)
    assume(np.prod(x.shape[x.ndim - k:]) > 1)
    y = normkit.layer_norm(x, x.shape[x.ndim - k:], eps=0.0)
    rows = y.reshape(-1, int(np.prod(x.shape[x.ndim - k:])))
    assert_standardized(rows)


@SETTINGS
@given(inputs(), st.sampled_from([1, 2]))
def test_group_norm_standardizes_groups(data, g):
    x, axis = data
    assume(x.size // (x.shape[0] * g) > 1)
    y = normkit.group_norm(x, g, eps=0.0, axis=axis)
    assert_standardized(groups(y, axis, per_sample=True, num_groups=g))


@SETTINGS
@given(inputs(), seeds)
def test_batch_renorm_has_mean_d_and_std_r(data, seed):
    """Per channel, the training output has mean d and std r."""
    x, axis = data
    c = x.shape[axis]
    r_ = np.random.default_rng(seed)
    rm = r_.normal(0, 5, size=c)
    rs = r_.uniform(0.1, 10.0, size=c)
    rows = groups(x, axis, per_sample=False)
    mu, sigma = rows.mean(axis=1), np.sqrt(rows.var(axis=1))
    r = np.clip(sigma / rs, 1 / 3, 3)
    d = np.clip((mu - rm) / rs, -5, 5)
    y = normkit.batch_renorm(x, rm.copy(), rs.copy(), training=True, eps=0.0, axis=axis)
    out = groups(y, axis, per_sample=False)
    np.testing.assert_allclose(out.mean(axis=1), d, atol=1e-6)
    np.testing.assert_allclose(out.std(axis=1), r, rtol=1e-6)


def per_channel(v, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


@SETTINGS
@given(inputs(), seeds)
def test_batch_norm_invariant_to_channel_scale_and_shift(data, seed):
    x, axis = data
    c = x.shape[axis]
    r_ = np.random.default_rng(seed)
    a = per_channel(r_.uniform(0.1, 10.0, size=c), axis, x.ndim)
    b = per_channel(r_.uniform(-100, 100, size=c), axis, x.ndim)
    y1 = normkit.batch_norm(x, training=True, eps=TINY_EPS, axis=axis)
    y2 = normkit.batch_norm(a * x + b, training=True, eps=TINY_EPS, axis=axis)
    np.testing.assert_allclose(y2, y1, atol=1e-7)


@SETTINGS
@given(inputs(), seeds)
def test_layer_norm_invariant_to_sample_scale_and_shift(data, seed):
    x, _ = data
    r_ = np.random.default_rng(seed)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    a = r_.uniform(0.1, 10.0, size=shape)
    b = r_.uniform(-100, 100, size=shape)
    ns = x.shape[1:]
    y1 = normkit.layer_norm(x, ns, eps=0.0)
    y2 = normkit.layer_norm(a * x + b, ns, eps=0.0)
    np.testing.assert_allclose(y2, y1, atol=1e-7)


@SETTINGS
@given(inputs(), seeds)
def test_group_norm_one_group_is_layer_norm_then_affine(data, seed):
    x, _ = data
    c = x.shape[1]
    r_ = np.random.default_rng(seed)
    w, b = r_.normal(size=c), r_.normal(size=c)
    gn = normkit.group_norm(x, 1, w, b, axis=1)
    ln = normkit.layer_norm(x, x.shape[1:])
    expected = ln * per_channel(w, 1, x.ndim) + per_channel(b, 1, x.ndim)
    np.testing.assert_allclose(gn, expected, atol=1e-9)


@SETTINGS
@given(inputs(min_ndim=3, min_spatial=2), seeds)
def test_group_norm_c_groups_is_instance_norm(data, seed):
    x, axis = data
    c = x.shape[axis]
    r_ = np.random.default_rng(seed)
    w, b = r_.normal(size=c), r_.normal(size=c)
    gn = normkit.group_norm(x, c, w, b, axis=axis)
    inn = normkit.instance_norm(x, weight=w, bias=b, axis=axis)
    np.testing.assert_allclose(gn, inn, atol=1e-9)
