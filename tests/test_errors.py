"""Bad inputs raise ValueError / TypeError before any state changes."""

import numpy as np
import pytest

import normkit
from conftest import VARIANT_NAMES, VARIANTS, make_case, make_layer

SHAPE_ERR = (ValueError, TypeError)
NDIM_MSG = r"(?i)(dim|\dd\b|\d-d)"
DTYPE_MSG = r"(?i)(dtype|float)"
ONE_VALUE_MSG = "Expected more than 1 value per channel when training"


def training_case(name, **kw):
    """A 3-D channels-first training case with affine and running stats."""
    return make_case(name, 3, "first", "train", True, rng=np.random.default_rng(5), **kw)


def snapshot(kwargs):
    return {k: np.array(v, copy=True) for k, v in kwargs.items()
            if k.startswith("running_") and v is not None}


def assert_raises_cleanly(case, exc, match, x=None, fn_name=None):
    """Call normkit with ``case`` and check the error and untouched stats."""
    fn = getattr(normkit, fn_name or case.name)
    before = snapshot(case.kwargs)
    with pytest.raises(exc, match=match):
        fn(case.x if x is None else x, *case.args, **case.kwargs)
    for key, value in before.items():
        np.testing.assert_array_equal(case.kwargs[key], value, err_msg=key)


def override_params():
    """(variant, kwarg override, match) for every argument check."""
    params = []
    for name in VARIANT_NAMES:
        v = VARIANTS[name]
        c = 4
        pshape = (5, 5) if name == "layer_norm" else (c + 1,)
        bad = [("weight", np.ones(pshape)), ("bias", np.zeros(pshape)),
               ("weight", np.ones((c, 1))),
               ("eps", -1e-5), ("eps", float("nan")), ("eps", float("inf"))]
        if v.has_axis:
            bad += [("axis", 3), ("axis", -4)]
        if v.stat_names:
            bad += [("momentum", -0.1), ("momentum", 1.5), ("momentum", float("nan")),
                    (v.stat_names[0], np.zeros(c + 1)), (v.stat_names[1], np.ones(c - 1)),
                    (v.stat_names[0], np.zeros((c, 1)))]
        for key, value in bad:
            vid = getattr(value, "shape", value)
            params.append(pytest.param(name, key, value, id=f"{name}-{key}={vid}"))
    return params


@pytest.mark.parametrize("name,key,value", override_params())
def test_bad_argument(name, key, value):
    case = training_case(name)
    case.kwargs[key] = value
    match = "axis" if key == "axis" else key
    assert_raises_cleanly(case, SHAPE_ERR, match)


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "batch_renorm"])
def test_bad_argument_in_eval_mode_too(name):
    case = make_case(name, 3, "first", "eval", True, rng=np.random.default_rng(0))
    case.kwargs["weight"] = np.ones(7)
    assert_raises_cleanly(case, SHAPE_ERR, "weight")


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128, object])
def test_bad_input_dtype(name, dtype):
    case = training_case(name)
    x = (case.x * 3).astype(dtype)
    assert_raises_cleanly(case, TypeError, DTYPE_MSG, x=x)


@pytest.mark.parametrize("name", [n for n in VARIANT_NAMES if n != "layer_norm"])
@pytest.mark.parametrize("shape", [(4,), ()], ids=["1d", "0d"])
def test_bad_input_ndim(name, shape):
    case = training_case(name)
    assert_raises_cleanly(case, SHAPE_ERR, NDIM_MSG, x=np.ones(shape))


@pytest.mark.parametrize("num_groups", [3, 0, -2, 8])
def test_num_groups_must_divide_channels(num_groups):
    case = training_case("group_norm")
    case.args = (num_groups,)
    assert_raises_cleanly(case, SHAPE_ERR, "num_groups")


@pytest.mark.parametrize("nshape", [(4,), (4, 4), (5, 4), (3, 4, 5, 1), (6, 4, 5)],
                         ids=str)
def test_normalized_shape_must_match_trailing_dims(nshape):
    case = training_case("layer_norm")
    case.args = (nshape,)
    case.kwargs["weight"] = np.ones(nshape)
    case.kwargs["bias"] = np.zeros(nshape)
    assert_raises_cleanly(case, SHAPE_ERR, "normalized_shape")


@pytest.mark.parametrize("name", ["batch_norm", "batch_renorm"])
@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)], ids=str)
def test_one_value_per_channel_in_training(name, shape):
    case = training_case(name)
    assert_raises_cleanly(case, ValueError, ONE_VALUE_MSG, x=np.ones(shape))


@pytest.mark.parametrize("name", ["batch_norm", "batch_renorm"])
def test_one_value_per_channel_in_training_layer(name):
    case = training_case(name)
    layer = make_layer(case)
    before = {k: getattr(layer, k).copy() for k in case.variant.stat_names}
    with pytest.raises(ValueError, match=ONE_VALUE_MSG):
        layer(np.ones((1, 4, 1)))
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(layer, k), v)
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("dy_shape", [(3, 4, 6), (3, 4), (4, 4, 5)], ids=str)
def test_backward_dy_wrong_shape(name, dy_shape):
    case = training_case(name)
    _, saved = getattr(normkit, name)(case.x, *case.args,
                                      **case.copied_kwargs(), return_saved=True)
    with pytest.raises(SHAPE_ERR, match="dy"):
        getattr(normkit, name + "_backward")(np.ones(dy_shape), case.x, saved)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_layer_backward_before_forward(name):
    layer = make_layer(training_case(name))
    with pytest.raises((ValueError, RuntimeError), match="(?i)forward"):
        layer.backward(np.ones((3, 4, 5)))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_layer_backward_dy_wrong_shape(name):
    case = training_case(name)
    layer = make_layer(case)
    layer(case.x)
    with pytest.raises(SHAPE_ERR, match="dy"):
        layer.backward(np.ones((3, 4, 6)))


@pytest.mark.parametrize("cls,shape", [
    ("BatchNorm1d", (3, 4, 5, 2)), ("BatchNorm1d", (4,)),
    ("BatchNorm2d", (3, 4, 5)), ("BatchNorm2d", (3, 4, 5, 2, 2)),
    ("BatchNorm3d", (3, 4, 5, 2)), ("BatchNorm3d", (3, 4)),
], ids=str)
def test_fixed_ndim_layers_reject_other_ndims(cls, shape):
    layer = getattr(normkit, cls)(4)
    before = (layer.running_mean.copy(), layer.running_var.copy())
    with pytest.raises(SHAPE_ERR, match=NDIM_MSG):
        layer(np.ones(shape))
    np.testing.assert_array_equal(layer.running_mean, before[0])
    np.testing.assert_array_equal(layer.running_var, before[1])
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "group_norm", "batch_renorm"])
def test_layer_wrong_channel_count(name):
    case = training_case(name)
    layer = make_layer(case)
    stats = {k: getattr(layer, k).copy() for k in case.variant.stat_names}
    with pytest.raises(SHAPE_ERR):
        layer(np.ones((3, 6, 5)))
    for k, v in stats.items():
        np.testing.assert_array_equal(getattr(layer, k), v)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64, object])
def test_layer_rejects_bad_dtype(dtype):
    layer = normkit.BatchNorm(4)
    with pytest.raises(TypeError, match=DTYPE_MSG):
        layer(np.ones((3, 4, 5), dtype=dtype))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(4))


@pytest.mark.parametrize("factory,match", [
    (lambda: normkit.BatchNorm(4, eps=-1.0), "eps"),
    (lambda: normkit.BatchNorm(4, momentum=1.5), "momentum"),
    (lambda: normkit.InstanceNorm(4, momentum=-0.5), "momentum"),
    (lambda: normkit.LayerNorm(4, eps=float("nan")), "eps"),
    (lambda: normkit.GroupNorm(3, 4), "num_groups"),
    (lambda: normkit.BatchRenorm(4, eps=float("inf")), "eps"),
], ids=["bn-eps", "bn-momentum", "in-momentum", "ln-eps", "gn-groups", "brn-eps"])
def test_layer_constructor_errors(factory, match):
    with pytest.raises(SHAPE_ERR, match=match):
        factory()
