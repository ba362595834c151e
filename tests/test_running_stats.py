"""Running statistics over several training steps, eval behaviour,
track_running_stats=False and the batch_renorm -> batch_norm limit."""

import numpy as np
import pytest

import normkit
from conftest import (VARIANTS, assert_close_scaled, make_case, make_layer,
                      nk_backward, nk_forward, ref_backward, ref_forward,
                      shape_for)

TRACKING = ("batch_norm", "instance_norm", "batch_renorm")
STEPS = 4


def momentum_params():
    return [pytest.param(name, m, id=f"{name}-momentum={m}")
            for name in TRACKING for m in (0.1, None)
            if not (name == "batch_renorm" and m is None)]


def batches(rng, layout, dtype, steps=STEPS, ndim=4):
    shape = shape_for(ndim, layout)
    return [(rng.normal(1.0, 2.0, size=shape) * (1 + k)).astype(dtype)
            for k in range(steps)]


@pytest.mark.parametrize("name,momentum", momentum_params())
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_steps_match_iterated_reference(name, momentum, layout, dtype, rng):
    case = make_case(name, 4, layout, "train", True, dtype=dtype, rng=rng,
                     momentum=momentum)
    keys = case.variant.stat_names
    nk_stats = {k: case.kwargs[k].copy() for k in keys}
    ref_stats = {k: case.kwargs[k].copy() for k in keys}
    for step, x in enumerate(batches(rng, layout, dtype)):
        case.x = x
        extra = {} if name == "batch_renorm" else {"num_batches_tracked": step}
        # call normkit directly (nk_forward copies) so the same arrays are
        # updated in place step after step
        fn = getattr(normkit, name)
        kw = case.copied_kwargs(**extra)
        kw.update(nk_stats)
        y = fn(x, **kw)
        expected, new = ref_forward(case, **ref_stats, **extra)
        assert_close_scaled(y, expected, dtype, what=f"y step {step}")
        for k in keys:
            # the arrays passed in were updated in place
            assert_close_scaled(nk_stats[k], new[k], dtype, what=f"{k} step {step}")
            ref_stats[k] = new[k]


@pytest.mark.parametrize("name,momentum", momentum_params())
@pytest.mark.parametrize("layout", ["first", "last"])
def test_layer_steps_then_eval(name, momentum, layout, rng):
    case = make_case(name, 4, layout, "train", False, rng=rng, momentum=momentum)
    layer = make_layer(case)
    assert layer.training
    keys = case.variant.stat_names
    ref_stats = {k: getattr(layer, k).copy() for k in keys}
    assert layer.num_batches_tracked == 0
    for step, x in enumerate(batches(rng, layout, np.float64)):
        y = layer(x)
        extra = {} if name == "batch_renorm" else {"num_batches_tracked": step}
        expected, ref_stats = ref_forward(case, x=x, **ref_stats, **extra)
        assert_close_scaled(y, expected, np.float64, what=f"y step {step}")
        for k in keys:
            assert_close_scaled(getattr(layer, k), ref_stats[k], np.float64, what=k)
        assert layer.num_batches_tracked == step + 1
        assert isinstance(layer.num_batches_tracked, (int, np.integer))

    # eval: normalize with the running statistics, change nothing
    assert layer.eval() is layer
    assert not layer.training
    frozen = {k: getattr(layer, k).copy() for k in keys}
    x = batches(rng, layout, np.float64, steps=1)[0]
    y = layer(x)
    expected, _ = ref_forward(case, x=x, **{case.variant.mode_key: False}, **frozen)
    assert_close_scaled(y, expected, np.float64, what="eval y")
    for k in keys:
        np.testing.assert_array_equal(getattr(layer, k), frozen[k])
    assert layer.num_batches_tracked == STEPS


@pytest.mark.parametrize("layout", ["first", "last"])
def test_batch_renorm_running_std_update(layout, rng):
    x = rng.normal(3.0, 5.0, size=shape_for(4, layout))
    axis = 1 if layout == "first" else -1
    rm, rs = np.zeros(4), np.ones(4)
    normkit.batch_renorm(x, rm, rs, training=True, momentum=0.25, eps=1e-5, axis=axis)
    xc = np.moveaxis(x, axis, -1).reshape(-1, 4)
    sigma = np.sqrt(xc.var(axis=0) + 1e-5)
    np.testing.assert_allclose(rm, 0.25 * xc.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(rs, 0.75 + 0.25 * sigma, rtol=1e-10)


@pytest.mark.parametrize("name", TRACKING)
def test_eval_mode_functional_leaves_running_stats(name, rng):
    case = make_case(name, 4, "first", "eval", True, rng=rng)
    _, used = nk_forward(case)
    for k in case.variant.stat_names:
        np.testing.assert_array_equal(used[k], case.kwargs[k])


@pytest.mark.parametrize("cls", ["BatchNorm", "InstanceNorm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_running_stats_uses_batch_statistics(cls, mode, rng):
    name = "batch_norm" if cls == "BatchNorm" else "instance_norm"
    layer = getattr(normkit, cls)(4, track_running_stats=False)
    assert layer.running_mean is None and layer.running_var is None
    getattr(layer, mode)()
    x = rng.normal(size=(3, 4, 5))
    y = layer(x)
    case = make_case(name, x=x, affine=False, running=False)
    expected, stats = ref_forward(case)
    assert stats == {}
    assert_close_scaled(y, expected, np.float64)
    assert layer.running_mean is None
    dy = rng.normal(size=x.shape)
    assert_close_scaled(layer.backward(dy), ref_backward(case, dy)[0], np.float64)


def test_instance_norm_default_layer_has_no_stats_or_affine():
    layer = normkit.InstanceNorm(4)
    assert layer.weight is None and layer.bias is None
    assert layer.running_mean is None and layer.running_var is None


@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_renorm_pinned_equals_batch_norm(layout, dtype, rng):
    """rmax=1, dmax=0 makes r=1, d=0: batch renorm is batch norm."""
    renorm = make_case("batch_renorm", 4, layout, "train", True, dtype=dtype,
                       rng=rng, rmax=1.0, dmax=0.0)
    bn = make_case("batch_norm", 4, layout, "train", True, x=renorm.x,
                   running=False, rng=rng)
    bn.kwargs["weight"] = renorm.kwargs["weight"]
    bn.kwargs["bias"] = renorm.kwargs["bias"]
    (y1, s1), _ = nk_forward(renorm, return_saved=True)
    (y2, s2), _ = nk_forward(bn, return_saved=True)
    assert_close_scaled(y1, y2, dtype, what="y")
    dy = rng.normal(size=y1.shape).astype(dtype)
    g1, g2 = nk_backward(renorm, dy, s1), nk_backward(bn, dy, s2)
    for a, b, what in zip(g1, g2, ("dx", "dweight", "dbias")):
        assert_close_scaled(a, b, dtype, 10, what=what)

    # and the layer
    layer = normkit.BatchRenorm(4, rmax=1.0, dmax=0.0, axis=renorm.axis)
    ref_layer = normkit.BatchNorm(4, axis=renorm.axis)
    assert_close_scaled(layer(renorm.x), ref_layer(renorm.x), dtype)
    assert_close_scaled(layer.backward(dy), ref_layer.backward(dy), dtype, 10)


@pytest.mark.parametrize("name", TRACKING)
def test_running_stats_affected_only_by_training(name, rng):
    v = VARIANTS[name]
    case = make_case(name, 4, "first", "train", True, rng=rng)
    layer = make_layer(case)
    layer.eval()
    for _ in range(3):
        layer(case.x)
    for k in v.stat_names:
        np.testing.assert_array_equal(getattr(layer, k), case.kwargs[k])
    assert layer.num_batches_tracked == 0
