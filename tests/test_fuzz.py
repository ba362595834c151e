"""Fuzz test over every public function and layer (issue 16).

Each example draws a call with hard inputs: shapes with zero and one sized
dimensions, every axis, float16/32/64, ``eps`` including 0, ``momentum``
including None, training and inference, weights present or absent, and
now and then one bad argument.  Every call must either

- return what the float64 reference (:mod:`normkit.reference`) returns,
  forward and backward, NaN and inf exactly where it has them and the rest
  within the dtype's tolerance, with the same running statistics; or
- raise ValueError or TypeError whose message names an argument (the bad
  one, when the call without it succeeds), leaving running statistics,
  counters, the power-iteration vectors and ``grads`` byte for byte as
  they were.

No other exception may escape.  The examples are derandomized and their
number is fixed (24 per target, 624 calls), so the run is the same
everywhere.
"""

import math
import os
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import normkit
from normkit import reference as ref

#: Examples per function or layer; set NORMKIT_FUZZ_EXAMPLES for a longer
#: run (the derandomized examples then extend CI's).
EXAMPLES = int(os.environ.get("NORMKIT_FUZZ_EXAMPLES", "24"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))

DTYPES = (np.float16, np.float32, np.float64)
#: Error bound relative to max(1, max |expected|) per dtype (float16 data
#: is normalized in float32, its output rounded to float16).
TOL = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 2e-4,
       np.dtype(np.float64): 1e-9}

FUNCTIONS = ("batch_norm", "instance_norm", "layer_norm", "group_norm",
             "batch_renorm", "rms_norm", "ghost_batch_norm", "weight_norm",
             "spectral_norm", "normalize", "normalize_with_statistics")
LAYERS = ("BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
          "InstanceNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
          "LayerNorm", "GroupNorm", "BatchRenorm", "RMSNorm", "GhostBatchNorm",
          "WeightNorm", "SpectralNorm")


class Bad:
    """Marks the argument an example deliberately made invalid."""

    def __init__(self, name):
        self.name = name


# --------------------------------------------------------------------------
# drawing calls
# --------------------------------------------------------------------------

def _values(draw, shape, dtype):
    """Data of ``shape``: small integers (exact in every dtype, so constant
    groups have a variance of exactly 0) or normal values."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    else:
        x = rng.normal(draw(st.sampled_from([0.0, 3.0])), 1.5, size=shape)
    return x.astype(dtype)


def _shape(draw, ndim):
    """Sizes 1 to 4 (the trailing ones up to 3); about one shape in four
    has a dimension of size 0."""
    shape = [draw(st.integers(1, 3 if i > 1 else 4)) for i in range(ndim)]
    if ndim == 5:
        shape[2:] = [draw(st.integers(1, 2)) for _ in range(3)]
    if draw(st.integers(0, 3)) == 0:
        shape[draw(st.integers(0, ndim - 1))] = 0
    return tuple(shape)


def _param(draw, shape, rng_seed, low=0.5, dtype=np.float64):
    rng = np.random.default_rng(rng_seed)
    values = rng.uniform(low, 2.0, size=shape) * draw(st.sampled_from([1.0, -1.0]))
    return values.astype(dtype)


def _weight(draw, shape, rng_seed):
    """A weight or bias of any float dtype."""
    return _param(draw, shape, rng_seed, dtype=draw(st.sampled_from(
        [np.float64, np.float32, np.float16])))


def _eps(draw):
    return draw(st.sampled_from([1e-5, 0.0, 0.1, 1e-5]))


def _maybe_bad(draw, options):
    """With probability about 1/4, one ``(name, value)`` of ``options``."""
    if options and draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(options))
    return None


@st.composite
def channel_call(draw, name, ndims=(2, 3, 4)):
    """A call of a channel-axis function: ``(x, args, kwargs, bad)``; five
    calls in six have one of ``ndims`` dimensions."""
    ndim = draw(st.sampled_from(ndims) if draw(st.integers(0, 5))
                else st.integers(2, 5))
    shape = list(_shape(draw, ndim))
    axis = draw(st.sampled_from([1, -1] + ([0] if name == "batch_norm" else []))
                if draw(st.integers(0, 3)) else st.integers(-ndim, ndim - 1))
    if draw(st.integers(0, 5)) == 0:                 # one sample
        shape[0] = 1
    C = shape[axis]
    dtype = draw(st.sampled_from(DTYPES))
    x = _values(draw, tuple(shape), dtype)
    seed = draw(st.integers(0, 1000))
    kw = {"eps": _eps(draw)}
    args = ()
    if draw(st.booleans()):
        kw["weight"] = _weight(draw, (C,), seed)
    if draw(st.booleans()):
        kw["bias"] = _weight(draw, (C,), seed + 1)
    mode = {"batch_norm": "training", "batch_renorm": "training",
            "ghost_batch_norm": "training",
            "instance_norm": "use_input_stats"}.get(name)
    if mode:
        kw[mode] = draw(st.booleans())
    spread = "running_std" if name == "batch_renorm" else "running_var"
    if mode and (name == "batch_renorm" or draw(st.booleans())):
        kw["running_mean"] = _param(draw, (C,), seed + 2)
        kw[spread] = np.abs(_param(draw, (C,), seed + 3))
        kw["momentum"] = draw(st.sampled_from(
            [0.1, 0.0, 1.0] + ([] if name == "batch_renorm" else [None])))
        if kw["momentum"] is None:
            kw["num_batches_tracked"] = draw(st.integers(0, 3))
    if name == "instance_norm" and not kw["use_input_stats"] \
            and "running_mean" not in kw:
        kw["use_input_stats"] = True
    if name != "layer_norm":
        kw["axis"] = axis
    if name == "group_norm":
        args = (draw(st.sampled_from([d for d in (1, 2, 4) if C % d == 0]
                                     or [1])),)
    if name == "ghost_batch_norm":
        args = (draw(st.sampled_from([1, 2, 3])),)
    bad = _maybe_bad(draw, [
        ("eps", -1.0), ("eps", float("nan")), ("axis", ndim + 1),
        ("weight", np.ones(C + 1)), ("x", x.astype(np.int64))]
        + ([("momentum", 1.5)] if "momentum" in kw else [])
        + ([("num_groups", 0)] if name == "group_norm" else [])
        + ([("virtual_batch_size", 0)] if name == "ghost_batch_norm" else []))
    return x, args, kw, bad


@st.composite
def trailing_call(draw, name):
    ndim = draw(st.integers(1, 3))
    shape = _shape(draw, ndim)
    k = draw(st.integers(1, ndim))
    nshape = shape[ndim - k:]
    dtype = draw(st.sampled_from(DTYPES))
    x = _values(draw, shape, dtype)
    seed = draw(st.integers(0, 1000))
    kw = {"weight": _weight(draw, nshape, seed) if draw(st.booleans()) else None,
          "eps": _eps(draw) if name == "layer_norm" or draw(st.booleans())
          else None}
    if name == "layer_norm" and draw(st.booleans()):
        kw["bias"] = _weight(draw, nshape, seed + 1)
    bad = _maybe_bad(draw, [("eps", -1.0), ("normalized_shape", (7,) + nshape),
                            ("weight", np.ones(nshape + (2,))),
                            ("x", x.astype(np.int32))])
    return x, (nshape,), kw, bad


@st.composite
def weight_call(draw, name):
    ndim = draw(st.integers(1, 3))
    shape = _shape(draw, ndim)
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from(DTYPES))
    w = _values(draw, shape, dtype)
    rows = shape[axis]
    seed = draw(st.integers(0, 1000))
    if name == "weight_norm":
        kw = {"axis": axis}
        bad = _maybe_bad(draw, [("g", np.ones(rows + 1)), ("axis", ndim)])
        return w, (_param(draw, (rows,), seed),), kw, bad
    rng = np.random.default_rng(seed)
    cols = math.prod(shape) // rows if rows else math.prod(
        shape[:axis % ndim] + shape[axis % ndim + 1:])
    kw = {"axis": axis, "training": draw(st.booleans()),
          "n_power_iterations": draw(st.integers(1, 2))}
    bad = _maybe_bad(draw, [("eps", 0.0), ("n_power_iterations", 0),
                            ("u", np.ones(rows + 1))])
    return w, (rng.standard_normal(rows), rng.standard_normal(cols)), kw, bad


@st.composite
def view_call(draw, name):
    dims = _shape(draw, 5)
    view = normkit.View(*dims)
    dtype = draw(st.sampled_from(DTYPES))
    x = _values(draw, (math.prod(dims),), dtype)
    seed = draw(st.integers(0, 1000))
    kj = view.K * view.J
    kw = {"weight": _param(draw, (kj,), seed) if draw(st.booleans()) else None,
          "bias": _param(draw, (kj,), seed + 1) if draw(st.booleans()) else None}
    if name == "normalize":
        kw["eps"] = _eps(draw)
        return x, (view,), kw, None
    rng = np.random.default_rng(seed)
    rows = draw(st.sampled_from([1, view.P])) if view.P else view.P
    mean = rng.normal(size=rows * view.K)
    rstd = rng.uniform(0.5, 2.0, size=rows * view.K)
    return x, (view, mean, rstd), kw, None


def draw_call(data, name):
    if name in ("layer_norm", "rms_norm", "LayerNorm", "RMSNorm"):
        strategy = trailing_call("layer_norm" if name[0] in "lL" else "rms_norm")
    elif name in ("weight_norm", "spectral_norm", "WeightNorm", "SpectralNorm"):
        strategy = weight_call(name.lower().replace("norm", "_norm")
                               if name[0].isupper() else name)
    elif name in ("normalize", "normalize_with_statistics"):
        strategy = view_call(name)
    else:
        strategy = channel_call(FUNCTION_OF[name], NDIMS.get(name, (2, 3, 4)))
    return data.draw(strategy)


#: Input dimensions of the layers that take only some.
NDIMS = {"BatchNorm1d": (2, 3), "BatchNorm2d": (4,), "BatchNorm3d": (5,),
         "InstanceNorm1d": (3,), "InstanceNorm2d": (4,), "InstanceNorm3d": (5,)}


FUNCTION_OF = {
    "batch_norm": "batch_norm", "instance_norm": "instance_norm",
    "group_norm": "group_norm", "batch_renorm": "batch_renorm",
    "ghost_batch_norm": "ghost_batch_norm",
    "BatchNorm": "batch_norm", "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm", "BatchNorm3d": "batch_norm",
    "InstanceNorm": "instance_norm", "InstanceNorm1d": "instance_norm",
    "InstanceNorm2d": "instance_norm", "InstanceNorm3d": "instance_norm",
    "GroupNorm": "group_norm", "BatchRenorm": "batch_renorm",
    "GhostBatchNorm": "ghost_batch_norm",
}


# --------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------

def assert_matches(actual, expected, dtype, what, factor=1.0):
    """NaN and inf where ``expected`` has them, the rest close."""
    if expected is None:
        assert actual is None, what
        return
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan, err_msg=f"{what}: NaN")
    inf = np.isinf(expected)
    np.testing.assert_array_equal(actual[inf], expected[inf], err_msg=f"{what}: inf")
    # values beyond the dtype's range round to inf of their sign
    over = ~(nan | inf) & (np.abs(expected) > np.finfo(dtype).max)
    np.testing.assert_array_equal(actual[over], np.sign(expected[over]) * np.inf,
                                  err_msg=f"{what}: overflow")
    finite = ~(nan | inf | over)
    assert np.isfinite(actual[finite]).all(), f"{what}: not finite"
    if finite.any():
        e = expected[finite]
        scale = max(1.0, float(np.abs(e).max()))
        err = float(np.abs(actual[finite] - e).max())
        assert err <= TOL[np.dtype(dtype)] * factor * scale, (
            f"{what}: error {err:.3g}, scale {scale:.3g}")


def snapshot(*objects):
    """Byte copies of every array and counter reachable by name."""
    state = {}
    for i, obj in enumerate(objects):
        items = obj.items() if isinstance(obj, dict) else vars(obj).items()
        for key, value in items:
            if isinstance(value, np.ndarray):
                state[(i, key)] = value.tobytes() + str(value.shape).encode()
            elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                state[(i, key)] = int(value)
            elif isinstance(value, dict) and key == "grads":
                state[(i, key)] = {k: v.tobytes() for k, v in value.items()}
    return state


WORDS = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def assert_names_argument(error, names, bad):
    assert type(error) in (ValueError, TypeError), repr(error)
    words = set(WORDS.findall(str(error)))
    if bad is not None:
        assert bad in words, f"{bad!r} not named in: {error}"
    assert words & (set(names) | {"input"}), f"no argument named in: {error}"


# --------------------------------------------------------------------------
# the calls
# --------------------------------------------------------------------------

def apply_bad(args, kw, bad, positional):
    """``args, kw`` with ``bad = (name, value)`` applied; ``positional``
    maps a positional argument's name to its index in ``args``."""
    if bad is None:
        return args, kw, None
    name, value = bad
    kw = dict(kw)
    args = list(args)
    if name in positional:
        args[positional[name]] = value
    elif name != "x":
        kw[name] = value
    return tuple(args), kw, name


POSITIONAL = {"group_norm": {"num_groups": 0},
              "ghost_batch_norm": {"virtual_batch_size": 0},
              "layer_norm": {"normalized_shape": 0},
              "rms_norm": {"normalized_shape": 0},
              "weight_norm": {"g": 0},
              "spectral_norm": {"u": 0, "v": 1}}


def reference_call(name, x, args, kw):
    """``(y, new_state, backward(dy))`` of the float64 reference."""
    kw = dict(kw)
    if name == "normalize" or name == "normalize_with_statistics":
        view = args[0]
        x5 = np.asarray(x, np.float64).reshape(view.dims)
        if name == "normalize":
            mean = x5.mean(axis=(1, 3, 4), keepdims=True)
            rstd = 1.0 / np.sqrt(x5.var(axis=(1, 3, 4), keepdims=True)
                                 + kw["eps"])
        else:
            rows = args[1].size // view.K if view.K else 1
            mean = args[1].reshape(rows, 1, view.K, 1, 1)
            rstd = args[2].reshape(rows, 1, view.K, 1, 1)
        xhat = (x5 - mean) * rstd
        shape = (1, 1, view.K, view.J, 1)
        w = None if kw["weight"] is None else kw["weight"].reshape(shape)
        b = None if kw["bias"] is None else kw["bias"].reshape(shape)
        y = xhat * (1.0 if w is None else w) + (0.0 if b is None else b)

        def backward(dy):
            dy5 = np.asarray(dy, np.float64).reshape(view.dims)
            g = dy5 * (1.0 if w is None else w)
            if name == "normalize":
                dx = rstd * (g - g.mean(axis=(1, 3, 4), keepdims=True) - xhat
                             * (g * xhat).mean(axis=(1, 3, 4), keepdims=True))
            else:
                dx = g * rstd
            dw = None if w is None else (dy5 * xhat).sum(axis=(0, 1, 4)).reshape(-1)
            db = None if b is None else dy5.sum(axis=(0, 1, 4)).reshape(-1)
            return dx.reshape(x.shape), dw, db
        return y.reshape(x.shape), {}, backward
    if name in ("weight_norm",):
        y = ref.weight_norm(x, args[0], kw["axis"])
        return y, {}, lambda dy: ref.weight_norm_backward(dy, x, args[0], kw["axis"])
    if name == "spectral_norm":
        y, u, v = ref.spectral_norm(x, *args, **kw)
        return y, {"u": u, "v": v}, lambda dy: (ref.spectral_norm_backward(
            dy, x, u, v, kw["axis"]),)
    fwd_only = ("momentum", "num_batches_tracked")
    out = getattr(ref, name)(x, *args, **kw)
    back_kw = {k: v for k, v in kw.items() if k not in fwd_only}
    if name == "rms_norm":
        back_kw.pop("bias", None)
    stats = {}
    if isinstance(out, tuple):
        y, s0, s1 = out
        spread = "running_std" if name == "batch_renorm" else "running_var"
        stats = {k: s for k, s in (("running_mean", s0), (spread, s1))
                 if s is not None}
    else:
        y = out
    return y, stats, lambda dy: getattr(ref, name + "_backward")(
        dy, x, *args, **back_kw)


def normkit_function(name, x, args, kw):
    fn = getattr(normkit, name)
    if name == "normalize":
        return fn(x, *args, **kw, return_saved=True)
    if name == "normalize_with_statistics":
        return fn(x, *args, **kw)
    return fn(x, *args, **kw, return_saved=True)


def normkit_backward(name, dy, x, saved):
    if name == "normalize_with_statistics" or name == "normalize":
        return normkit.normalize_backward(dy, x, saved)
    out = getattr(normkit, name + "_backward")(dy, x, saved)
    return out if isinstance(out, tuple) else (out,)


def _copies(args, kw):
    return (tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args),
            {k: (v.copy() if isinstance(v, np.ndarray) else v)
             for k, v in kw.items()})


ARGUMENT_NAMES = {"x", "v", "w", "g", "u", "dy", "view", "mean", "rstd",
                  "weight", "bias"}


def check_function(name, x, args, kw, bad):
    args_b, kw_b, bad_name = apply_bad(args, kw, bad, POSITIONAL.get(name, {}))
    x_b = bad[1] if bad_name == "x" else x
    args_ref, kw_ref = _copies(args_b, kw_b)
    arrays = [a for a in list(args_b) + list(kw_b.values())
              if isinstance(a, np.ndarray)]
    before = [a.tobytes() for a in arrays]
    try:
        y, saved = normkit_function(name, x_b, args_b, kw_b)
    except Exception as error:                      # noqa: BLE001
        names = ARGUMENT_NAMES | set(kw_b) | set(POSITIONAL.get(name, {}))
        named = bad_name if bad_name and not _fails(name, x, args, kw) else None
        event(f"refused ({'bad ' + bad_name if named else 'invalid call'})")
        assert_names_argument(error, names, named)
        assert [a.tobytes() for a in arrays] == before, "state changed"
        return
    assert bad_name is None, f"bad {bad_name}={bad[1]!r} accepted"
    event("empty input" if x.size == 0 else "returned")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_ref, stats_ref, backward_ref = reference_call(name, x, args_ref,
                                                        kw_ref)
    assert y.dtype == x.dtype
    assert_matches(y, y_ref, x.dtype, f"{name} y")
    for key, value in stats_ref.items():
        got = kw_b[key] if key in kw_b else args_b[POSITIONAL[name][key]]
        assert_matches(got, value, x.dtype, f"{name} {key}")
    dy = _values_like(x)
    grads = normkit_backward(name, dy, x, saved)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = backward_ref(dy)
    for i, (got, want) in enumerate(zip(grads, expected)):
        # parameter gradients come in the parameter's dtype
        dtype = x.dtype if i == 0 else _coarsest(x, kw_b.get("weight"),
                                                 kw_b.get("bias"))
        assert_matches(got, want, dtype, f"{name} grad {i}", factor=10.0)


def _coarsest(*arrays):
    return max((a.dtype for a in arrays if isinstance(a, np.ndarray)),
               key=lambda dtype: TOL[np.dtype(dtype)])


def _fails(name, x, args, kw):
    """Whether the call without the bad argument raises too."""
    kw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    args = tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)
    try:
        normkit_function(name, x, args, kw)
    except (ValueError, TypeError):
        return True
    return False


def _values_like(x):
    rng = np.random.default_rng(x.size)
    return rng.normal(size=x.shape).astype(x.dtype)


# --------------------------------------------------------------------------
# layers: built from a functional call, checked against its reference
# --------------------------------------------------------------------------

LAYER_FUNCTION = dict(FUNCTION_OF, LayerNorm="layer_norm", RMSNorm="rms_norm",
                      WeightNorm="weight_norm", SpectralNorm="spectral_norm")

LAYER_NAMES = {"x", "num_features", "num_channels", "num_groups", "eps",
               "momentum", "axis", "normalized_shape", "virtual_batch_size",
               "num_units", "weight_shape", "n_power_iterations", "g", "v"}


def make_layer(cls, x, args, kw):
    """The layer ``cls`` holding ``kw``'s parameters and state in its mode,
    and ``(func, args, kw)``: the functional call computing the same."""
    func = LAYER_FUNCTION[cls]
    Layer = getattr(normkit, cls)
    kw = dict(kw)
    affine = kw.get("weight") is not None
    has_bias = kw.get("bias") is not None
    if not affine and func not in ("weight_norm", "spectral_norm"):
        kw["bias"] = None               # no affine parameters, no bias
    if func in ("layer_norm", "rms_norm"):
        if func == "layer_norm":
            layer = Layer(args[0], kw["eps"], affine, bias=has_bias or not affine)
        else:
            layer = Layer(args[0], kw["eps"], affine)
            kw.pop("bias", None)
    elif func == "weight_norm":
        layer = Layer(max(1, args[0].size), kw["axis"])
        layer.g = args[0].copy()
        return layer, func, args, {"axis": kw["axis"]}
    elif func == "spectral_norm":
        layer = Layer(x.shape, kw["axis"], kw["n_power_iterations"])
        layer.train(kw["training"])
        return layer, func, (layer.u.copy(), layer.v.copy()), kw
    elif func == "group_norm":
        C = x.shape[kw["axis"]]
        layer = Layer(args[0], C, kw["eps"], affine, kw["axis"],
                      bias=has_bias or not affine)
    else:
        C = x.shape[kw["axis"]]
        mode = "use_input_stats" if func == "instance_norm" else "training"
        tracking = kw.get("running_mean") is not None
        options = dict(eps=kw["eps"], momentum=kw.get("momentum", 0.1),
                       affine=affine, axis=kw["axis"],
                       bias=has_bias or not affine)
        if func == "ghost_batch_norm":
            layer = Layer(C, args[0], track_running_stats=tracking, **options)
        elif func == "batch_renorm":
            layer = Layer(C, **options)
        else:
            layer = Layer(C, track_running_stats=tracking, **options)
        if tracking:
            layer.running_mean[...] = kw["running_mean"]
            getattr(layer, layer.spread_name)[...] = kw[layer.spread_name]
            layer.num_batches_tracked = kw.get("num_batches_tracked", 0)
            if layer.momentum is None:
                kw["num_batches_tracked"] = layer.num_batches_tracked
        layer.train(bool(kw.get(mode, True)))
    if affine:
        layer.weight[...] = kw["weight"]
        if layer.bias is not None:
            layer.bias[...] = kw["bias"]
    return layer, func, args, kw


def check_layer(cls, x, args, kw, bad, unbatched):
    try:
        layer, func, args, kw = make_layer(cls, x, args, kw)
    except (ValueError, TypeError) as error:
        event("constructor refused")
        assert_names_argument(error, LAYER_NAMES | set(kw), None)
        return
    x_in = x[0] if unbatched else x
    if bad is not None and bad[0] == "x":
        x_in = x_in.astype(bad[1].dtype)
    layer.grads = {"sentinel": np.arange(3.0)}
    state = snapshot(layer)
    try:
        y = layer(x_in)
    except Exception as error:                      # noqa: BLE001
        bad_x = x_in.dtype != x.dtype
        event("refused")
        assert_names_argument(error, LAYER_NAMES, "x" if bad_x else None)
        assert snapshot(layer) == state, "state changed"
        return
    assert x_in.dtype == x.dtype, "an integer x was accepted"
    event("empty input" if x_in.size == 0 else "unbatched" if
          getattr(type(layer), "unbatched_ndim", None) == x_in.ndim else "returned")
    # the unbatched form of a layer that takes one is a batch of one
    one = getattr(type(layer), "unbatched_ndim", None) == x_in.ndim
    x_ref = x_in[None] if one else x_in
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_ref, stats_ref, backward_ref = reference_call(func, x_ref, args, kw)
    assert y.dtype == x.dtype
    assert_matches(y, y_ref[0] if one else y_ref, x.dtype, f"{cls} y")
    for key, value in stats_ref.items():
        assert_matches(getattr(layer, key), value, x.dtype, f"{cls} {key}")
    state = snapshot(layer)
    with pytest.raises((ValueError, TypeError), match="dy"):
        layer.backward(np.ones(x_in.shape + (1,), x.dtype))
    assert snapshot(layer) == state, "a bad dy changed the state"
    dy = _values_like(x_in)
    dx = layer.backward(dy)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = backward_ref(dy[None] if one else dy)
    assert_matches(dx, expected[0][0] if one else expected[0], x.dtype,
                   f"{cls} dx", factor=10.0)
    names = {"weight_norm": ("g",), "spectral_norm": ()}.get(
        func, ("weight", "bias"))
    for name, want in zip(names, expected[1:]):
        assert_matches(layer.grads.get(name), want, x.dtype, f"{cls} d{name}",
                       factor=10.0)


# --------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", FUNCTIONS)
@SETTINGS
@given(data=st.data())
def test_function_fuzz(name, data):
    x, args, kw, bad = draw_call(data, name)
    check_function(name, x, args, kw, bad)


@pytest.mark.parametrize("cls", LAYERS)
@SETTINGS
@given(data=st.data())
def test_layer_fuzz(cls, data):
    x, args, kw, bad = draw_call(data, cls)
    if cls[-2:] in ("1d", "2d", "3d") and kw.get("axis") == 0:
        kw = dict(kw, axis=1)
        if x.shape[1] != x.shape[0]:
            return                      # the weights were drawn for axis 0
    unbatched = (cls.startswith("InstanceNorm") and cls[-1] == "d"
                 and x.ndim > 2 and x.shape[0] > 0 and data.draw(st.booleans()))
    check_layer(cls, x, args, kw, bad, unbatched)
