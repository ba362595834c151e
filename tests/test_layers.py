"""Layer objects: defaults, modes, shapes, state dicts, registry, schedule."""

import numpy as np
import pytest

import normkit
from conftest import (VARIANT_NAMES, VARIANTS, assert_close_scaled, make_case,
                      make_layer, nk_forward)

LAYER_FACTORIES = {
    "BatchNorm": lambda: normkit.BatchNorm(4),
    "InstanceNorm": lambda: normkit.InstanceNorm(4, affine=True, track_running_stats=True),
    "LayerNorm": lambda: normkit.LayerNorm((4, 5)),
    "GroupNorm": lambda: normkit.GroupNorm(2, 4),
    "BatchRenorm": lambda: normkit.BatchRenorm(4),
}
STAT_KEYS = {
    "BatchNorm": ("running_mean", "running_var"),
    "InstanceNorm": ("running_mean", "running_var"),
    "BatchRenorm": ("running_mean", "running_std"),
    "LayerNorm": (), "GroupNorm": (),
}
LAYERS = list(LAYER_FACTORIES)


@pytest.fixture
def x345(rng):
    return rng.normal(1.0, 2.0, size=(3, 4, 5))


@pytest.mark.parametrize("cls", LAYERS)
def test_defaults(cls):
    layer = LAYER_FACTORIES[cls]()
    assert layer.training is True
    shape = (4, 5) if cls == "LayerNorm" else (4,)
    assert layer.weight.dtype == np.float64 and layer.weight.shape == shape
    np.testing.assert_array_equal(layer.weight, np.ones(shape))
    np.testing.assert_array_equal(layer.bias, np.zeros(shape))
    keys = STAT_KEYS[cls]
    if keys:
        np.testing.assert_array_equal(getattr(layer, keys[0]), np.zeros(4))
        np.testing.assert_array_equal(getattr(layer, keys[1]), np.ones(4))
        assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("factory", [
    lambda: normkit.BatchNorm(4, affine=False),
    lambda: normkit.InstanceNorm(4),
    lambda: normkit.LayerNorm(5, elementwise_affine=False),
    lambda: normkit.GroupNorm(2, 4, affine=False),
    lambda: normkit.BatchRenorm(4, affine=False),
], ids=["bn", "in", "ln", "gn", "brn"])
def test_not_affine_has_no_params_or_grads(factory, x345, rng):
    layer = factory()
    assert layer.weight is None and layer.bias is None
    layer(x345)
    layer.backward(rng.normal(size=x345.shape))
    grads = getattr(layer, "grads", None) or {}
    assert grads.get("weight") is None and grads.get("bias") is None


@pytest.mark.parametrize("cls", LAYERS)
def test_call_equals_forward_and_modes(cls, x345):
    a, b = LAYER_FACTORIES[cls](), LAYER_FACTORIES[cls]()
    np.testing.assert_array_equal(a(x345), b.forward(x345))
    assert a.eval() is a and a.training is False
    assert a.train() is a and a.training is True
    for key in STAT_KEYS[cls]:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_layer_matches_functional(name, layout, dtype, rng):
    for mode in VARIANTS[name].modes():
        case = make_case(name, 4, layout, mode, True, dtype=dtype, rng=rng)
        layer = make_layer(case)
        expected, used = nk_forward(case)
        y = layer(case.x)
        assert y.dtype == np.dtype(dtype)
        assert_close_scaled(y, expected, dtype)
        for key in case.variant.stat_names:
            assert_close_scaled(getattr(layer, key), used[key], dtype)


@pytest.mark.parametrize("cls,shape", [
    ("BatchNorm1d", (3, 4)), ("BatchNorm1d", (3, 4, 5)),
    ("BatchNorm2d", (3, 4, 2, 5)), ("BatchNorm3d", (3, 4, 2, 3, 2)),
], ids=str)
def test_fixed_ndim_batch_norms_accept_their_shapes(cls, shape, rng):
    layer = getattr(normkit, cls)(4)
    assert isinstance(layer, normkit.BatchNorm)
    x = rng.normal(size=shape)
    expected = normkit.BatchNorm(4)(x)
    np.testing.assert_allclose(layer(x), expected, rtol=0, atol=1e-12)
    assert layer.num_batches_tracked == 1


@pytest.mark.parametrize("cls", LAYERS)
def test_state_dict_is_a_copy_and_round_trips(cls, x345, rng):
    layer = LAYER_FACTORIES[cls]()
    if layer.weight is not None:
        layer.weight[...] = rng.normal(size=layer.weight.shape)
    layer(x345)
    layer(x345 * 2)
    sd = layer.state_dict()
    expected_keys = {"weight", "bias", *STAT_KEYS[cls]}
    if STAT_KEYS[cls]:
        expected_keys.add("num_batches_tracked")
    assert expected_keys <= set(sd) <= expected_keys | {"num_batches_tracked"}
    saved = {k: np.array(v, copy=True) for k, v in sd.items()}
    # mutating the returned dict's arrays does not touch the layer
    for k, v in sd.items():
        if isinstance(v, np.ndarray):
            v[...] = 123.0
    for k in saved:
        if isinstance(sd[k], np.ndarray):
            np.testing.assert_array_equal(getattr(layer, k), saved[k])

    fresh = LAYER_FACTORIES[cls]()
    fresh.load_state_dict(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(getattr(fresh, k), v)
    # loading copies too: mutating the source dict afterwards has no effect
    for v in saved.values():
        if isinstance(v, np.ndarray):
            v[...] = -7.0
    assert not np.any(fresh.weight == -7.0)
    fresh.eval(), layer.eval()
    np.testing.assert_array_equal(fresh(x345), layer(x345))


def broken_state_dicts(cls):
    layer = LAYER_FACTORIES[cls]()
    good = layer.state_dict()
    out = []
    for key in good:
        missing = dict(good)
        del missing[key]
        out.append((f"missing-{key}", missing, key))
        value = good[key]
        if isinstance(value, np.ndarray):
            wrong = dict(good)
            wrong[key] = np.ones(value.size + 1)
            out.append((f"shape-{key}", wrong, key))
    extra = dict(good)
    extra["surprise"] = np.ones(4)
    out.append(("extra", extra, "surprise"))
    return out


@pytest.mark.parametrize("cls", LAYERS)
def test_load_state_dict_rejections_change_nothing(cls, x345, rng):
    for tag, bad, key in broken_state_dicts(cls):
        layer = LAYER_FACTORIES[cls]()
        if layer.weight is not None:
            layer.weight[...] = rng.normal(size=layer.weight.shape)
        layer(x345)
        before = layer.state_dict()
        # make every loadable entry differ so a partial load would show
        bad = {k: (v + 1.0 if isinstance(v, np.ndarray) else v) for k, v in bad.items()}
        with pytest.raises((KeyError, ValueError), match=key):
            layer.load_state_dict(bad)
        after = layer.state_dict()
        assert set(after) == set(before), tag
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=f"{tag}: {k}")


def test_momentum_none_counts_batches(x345):
    layer = normkit.BatchNorm(4, momentum=None)
    for k in range(3):
        layer(x345 + k)
    assert layer.num_batches_tracked == 3
    xs = np.stack([x345 + k for k in range(3)])
    np.testing.assert_allclose(layer.running_mean,
                               np.moveaxis(xs, 2, -1).reshape(3, -1, 4).mean(axis=1).mean(axis=0))


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

def test_available_lists_builtins():
    names = normkit.available()
    assert isinstance(names, list)
    assert names == sorted(names)
    assert set(VARIANT_NAMES) <= set(names)


@pytest.mark.parametrize("name,kwargs,cls", [
    ("batch_norm", {"num_features": 4}, "BatchNorm"),
    ("instance_norm", {"num_features": 4}, "InstanceNorm"),
    ("layer_norm", {"normalized_shape": (4, 5)}, "LayerNorm"),
    ("group_norm", {"num_groups": 2, "num_channels": 4}, "GroupNorm"),
    ("batch_renorm", {"num_features": 4}, "BatchRenorm"),
])
def test_create_builtin(name, kwargs, cls, x345):
    layer = normkit.create(name, **kwargs)
    assert isinstance(layer, getattr(normkit, cls))
    reference = getattr(normkit, cls)(**kwargs)
    np.testing.assert_array_equal(layer(x345), reference(x345))


def test_register_and_duplicate():
    class Identity:
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, x):
            return x * self.scale

    name = "test_identity_norm_for_registry"
    if name not in normkit.available():
        normkit.register(name, Identity)
    assert name in normkit.available()
    obj = normkit.create(name, scale=2.0)
    assert isinstance(obj, Identity) and obj.scale == 2.0
    with pytest.raises(ValueError, match=name):
        normkit.register(name, Identity)
    with pytest.raises(ValueError):
        normkit.register("batch_norm", Identity)


def test_create_unknown_name():
    with pytest.raises((KeyError, ValueError), match="no_such_norm"):
        normkit.create("no_such_norm")


# ---------------------------------------------------------------------------
# batch renorm schedule
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("step,expected", [
    (0, (1.0, 0.0)),
    (4999, (1.0, 0.0)),
    (5000, (1.0, 0.0)),
    (15000, (1.0 + 2.0 * 10000 / 35000, 5.0 * 10000 / 20000)),
    (25000, (1.0 + 2.0 * 20000 / 35000, 5.0)),
    (40000, (3.0, 5.0)),
    (10**6, (3.0, 5.0)),
])
def test_batch_renorm_schedule(step, expected):
    got = normkit.batch_renorm_schedule(step)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_batch_renorm_schedule_custom_and_monotone():
    steps = np.arange(0, 120, 3)
    vals = np.array([normkit.batch_renorm_schedule(s, warmup=10, rmax_step=100,
                                                   dmax_step=50, rmax=2.0, dmax=1.0)
                     for s in steps])
    assert np.all(np.diff(vals[:, 0]) >= 0) and np.all(np.diff(vals[:, 1]) >= 0)
    np.testing.assert_allclose(vals[steps >= 100, 0], 2.0)
    np.testing.assert_allclose(vals[steps >= 50, 1], 1.0)
    np.testing.assert_allclose(normkit.batch_renorm_schedule(30, warmup=10, rmax_step=100,
                                                             dmax_step=50, rmax=2.0, dmax=1.0),
                               (1.0 + 20 / 90, 20 / 40))
