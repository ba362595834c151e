"""Shared fixtures and helpers for the normkit test-suite.

The central piece is a small table of *variant descriptors* (``VARIANTS``)
plus :func:`make_case`, which builds a consistent set of inputs for one
variant / layout / ndim / dtype / mode / affine combination.  Test modules
then call :func:`nk_forward`, :func:`nk_backward`, :func:`ref_forward` and
:func:`ref_backward` instead of spelling out each variant's signature.
"""

import copy
import dataclasses
import os
import zlib

# The CUDA tests (tests/test_cuda*.py) run on Numba's CUDA simulator where
# there is no NVIDIA driver (CI); on a GPU machine they run natively.  Numba
# reads this when it is first imported, hence before any other import.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest

from normkit import reference as ref

#: With NORMKIT_RECORD_LAUNCHES=PATH, every CUDA kernel the simulator
#: tests launch is written to PATH at the end of the session, for
#: ``python tests/cuda_ptx_check.py --compile PATH`` (CI: one run of the
#: simulator tests serves both).
_LAUNCHES_PATH = os.environ.get("NORMKIT_RECORD_LAUNCHES")
if _LAUNCHES_PATH and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import cuda_ptx_check
    _LAUNCHES = cuda_ptx_check.install_recorder()

    def pytest_sessionfinish(session, exitstatus):
        cuda_ptx_check.write_launches(_LAUNCHES, _LAUNCHES_PATH)

DTYPES = (np.float16, np.float32, np.float64)
NDIMS = (2, 3, 4, 5)
LAYOUTS = ("first", "last")  # channel axis 1 / -1 (layer_norm: see make_case)
N_BATCH = 3
N_CHANNELS = 4
SPATIAL = {2: (), 3: (5,), 4: (3, 5), 5: (3, 2, 3)}


# ---------------------------------------------------------------------------
# variant descriptors
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    mode_key: str | None        # kwarg switching batch vs running statistics
    stat_names: tuple           # running statistics, in reference return order
    has_axis: bool
    min_train_ndim: int         # smallest ndim with >1 value per stats group
    fwd_only: tuple = ("momentum", "num_batches_tracked")  # not in backward

    def modes(self):
        return ("train", "eval") if self.mode_key else ("train",)


VARIANTS = {
    "batch_norm": Variant("batch_norm", "training",
                          ("running_mean", "running_var"), True, 2),
    "instance_norm": Variant("instance_norm", "use_input_stats",
                             ("running_mean", "running_var"), True, 3),
    "layer_norm": Variant("layer_norm", None, (), False, 2),
    "group_norm": Variant("group_norm", None, (), True, 2),
    "batch_renorm": Variant("batch_renorm", "training",
                            ("running_mean", "running_std"), True, 2),
}
VARIANT_NAMES = tuple(VARIANTS)


@dataclasses.dataclass
class Case:
    """Inputs for one call of a variant (normkit and reference alike)."""
    variant: Variant
    x: np.ndarray
    args: tuple
    kwargs: dict
    axis: int | None

    @property
    def name(self):
        return self.variant.name

    def copied_kwargs(self, **overrides):
        kw = copy.deepcopy(self.kwargs)
        kw.update(overrides)
        return kw

    @property
    def uses_batch_stats(self):
        key = self.variant.mode_key
        return key is None or bool(self.kwargs.get(key))

    @property
    def param_shape(self):
        if self.name == "layer_norm":
            return tuple(self.args[0])
        return (self.x.shape[self.axis],)


def shape_for(ndim, layout, channels=N_CHANNELS, batch=N_BATCH):
    spatial = SPATIAL[ndim]
    if layout == "first":
        return (batch, channels) + spatial
    return (batch,) + spatial + (channels,)


def positive(rng, shape, low=0.5, high=2.0):
    return rng.uniform(low, high, size=shape)


def make_case(name, ndim=3, layout="first", mode="train", affine=True,
              dtype=np.float64, rng=None, running=True, x=None, eps=1e-5,
              momentum=0.1, **extra):
    """Build inputs for ``name``.

    ``layout`` is the channel axis (``"first"`` -> 1, ``"last"`` -> -1); for
    layer_norm it selects the normalized shape instead (``"first"``: every
    non-batch dimension, ``"last"``: only the last one).  ``mode`` is
    ``"train"`` (batch statistics) or ``"eval"`` (running statistics).
    ``running`` controls whether running statistics are passed in training
    mode (always passed for eval, always for batch_renorm).
    """
    variant = VARIANTS[name]
    rng = np.random.default_rng(0) if rng is None else rng
    if x is None:
        shape = shape_for(ndim, layout)
        x = rng.normal(0.5, 2.0, size=shape) + rng.normal(0, 1, size=shape[-1])
        x = x.astype(dtype)
    axis = None
    args = ()
    kw = {}
    if variant.has_axis:
        axis = 1 if layout == "first" else -1
    if name == "layer_norm":
        nshape = x.shape[1:] if layout == "first" else x.shape[-1:]
        args = (tuple(nshape),)
    elif name == "group_norm":
        args = (2,)
    pshape = nshape if name == "layer_norm" else (x.shape[axis],)
    if affine:
        kw["weight"] = positive(rng, pshape)
        kw["bias"] = rng.normal(0, 1, size=pshape)
    else:
        kw["weight"] = None
        kw["bias"] = None
    if variant.stat_names:
        c = pshape[0]
        if running or mode == "eval" or name == "batch_renorm":
            kw[variant.stat_names[0]] = rng.normal(0, 1, size=c)
            kw[variant.stat_names[1]] = positive(rng, c)
        kw[variant.mode_key] = mode == "train"
        kw["momentum"] = momentum
    kw["eps"] = eps
    if axis is not None:
        kw["axis"] = axis
    kw.update(extra)
    return Case(variant, x, args, kw, axis)


# ---------------------------------------------------------------------------
# calling normkit and the reference uniformly
# ---------------------------------------------------------------------------

def nk_forward(case, return_saved=False, **overrides):
    """Call normkit; returns ``(output, kwargs_used)``.

    The running statistics in ``kwargs_used`` are copies of the case's and
    hold whatever normkit left in them (it updates them in place).
    """
    import normkit
    kw = case.copied_kwargs(**overrides)
    fn = getattr(normkit, case.name)
    out = fn(case.x, *case.args, **kw, return_saved=return_saved)
    return out, kw


def nk_backward(case, dy, saved):
    import normkit
    return getattr(normkit, case.name + "_backward")(dy, case.x, saved)


def ref_forward(case, x=None, **overrides):
    """Reference forward: ``(y, {stat_name: new_value})``."""
    kw = case.copied_kwargs(**overrides)
    x = case.x if x is None else x
    out = getattr(ref, case.name)(x, *case.args, **kw)
    if not case.variant.stat_names:
        return out, {}
    y, s0, s1 = out
    stats = {}
    for key, val in zip(case.variant.stat_names, (s0, s1)):
        if val is not None:
            stats[key] = val
    return y, stats


def ref_backward(case, dy, x=None, **overrides):
    kw = case.copied_kwargs(**overrides)
    for key in case.variant.fwd_only:
        kw.pop(key, None)
    x = case.x if x is None else x
    return getattr(ref, case.name + "_backward")(dy, x, *case.args, **kw)


# ---------------------------------------------------------------------------
# numerics helpers
# ---------------------------------------------------------------------------

TOLERANCE = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-4,
             np.dtype(np.float64): 1e-10}

try:  # bfloat16 (ml_dtypes, in the test extra): 7 fraction bits to float16's 10
    import ml_dtypes
except ImportError:
    BFLOAT16 = None
else:
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
    TOLERANCE[BFLOAT16] = 2e-2


def tol_for(dtype):
    return TOLERANCE[np.dtype(dtype)]


def assert_close_scaled(actual, expected, dtype, factor=1.0, what=""):
    """``max|actual - expected| <= tol(dtype) * max(1, max|expected|)``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    bound = tol_for(dtype) * factor * scale
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


#: Non-finite values put into successive groups of a view (cycling):
#: +inf; -inf and +inf; a NaN; a NaN and +inf; none.
GROUP_SPECIALS = ([np.inf], [-np.inf, np.inf], [np.nan], [np.nan, np.inf], [])


def with_nonfinite_groups(view, dtype, rng):
    """Normal data of ``view.dims`` (P, A, K, J, B) in ``dtype``, group
    ``(p, k)`` holding the values of ``GROUP_SPECIALS[(p * K + k) % 5]``
    at random places of its own."""
    x = rng.normal(1.0, 2.0, size=view.dims)
    for group in range(view.P * view.K):
        p, k = divmod(group, view.K)
        specials = GROUP_SPECIALS[group % len(GROUP_SPECIALS)]
        places = rng.choice(view.group_size, size=len(specials), replace=False)
        for place, value in zip(places, specials):
            a, rest = divmod(int(place), view.J * view.B)
            j, b = divmod(rest, view.B)
            x[p, a, k, j, b] = value
    return x.astype(dtype)


def view_formulas(x, dy, view, weight, bias, eps, centered):
    """Normalization over ``view`` written plainly from the formulas, in
    float64: ``(y, mean, var, dx, dweight, dbias)``, ``y`` and ``dx`` flat,
    the statistics ``(P, K)``, per group ``(p, k)`` over ``(a, j, b)``
    (not ``centered``: mean 0 and ``var`` the mean square)."""
    x = x.astype(np.float64).reshape(view.dims)
    dy = dy.astype(np.float64).reshape(view.dims)
    axes = (1, 3, 4)
    mean = (x.mean(axis=axes, keepdims=True) if centered
            else np.zeros((view.P, 1, view.K, 1, 1)))
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    g = weight.astype(np.float64).reshape(1, 1, view.K, view.J, 1)
    y = xhat * g + bias.reshape(g.shape)
    gdy = g * dy
    centering = gdy.mean(axis=axes, keepdims=True) if centered else 0.0
    dx = rstd * (gdy - centering
                 - xhat * (gdy * xhat).mean(axis=axes, keepdims=True))
    dweight = (dy * xhat).sum(axis=(0, 1, 4)).reshape(-1)
    dbias = dy.sum(axis=(0, 1, 4)).reshape(-1)
    return (y.reshape(-1), mean.reshape(view.P, view.K),
            var.reshape(view.P, view.K), dx.reshape(-1), dweight, dbias)


def numerical_grad(f, a, h=1e-6):
    """Central finite-difference gradient of the scalar ``f(a)`` w.r.t. ``a``.

    ``a`` is not modified; ``f`` receives a perturbed float64 copy.
    """
    a = np.array(a, dtype=np.float64, copy=True)
    grad = np.empty_like(a)
    flat = a.reshape(-1)
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + h
        fp = f(a.copy())
        flat[i] = orig - h
        fm = f(a.copy())
        flat[i] = orig
        gflat[i] = (fp - fm) / (2 * h)
    return grad


@pytest.fixture
def rng(request):
    """A deterministic generator, seeded per test from its node id."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def matrix(variants=VARIANT_NAMES, ndims=NDIMS, layouts=LAYOUTS,
           dtypes=DTYPES, affines=(True, False), modes=None):
    """Valid (variant, ndim, layout, mode, affine, dtype) combinations."""
    params = []
    for name in variants:
        v = VARIANTS[name]
        for ndim in ndims:
            for layout in layouts:
                for mode in (modes or v.modes()):
                    if mode not in v.modes():
                        continue
                    if mode == "train" and ndim < v.min_train_ndim:
                        continue
                    for affine in affines:
                        for dtype in dtypes:
                            pid = (f"{name}-{ndim}d-{layout}-{mode}-"
                                   f"{'affine' if affine else 'plain'}-"
                                   f"{np.dtype(dtype).name}")
                            params.append(pytest.param(
                                name, ndim, layout, mode, affine, dtype, id=pid))
    return params


MATRIX_ARGS = "name,ndim,layout,mode,affine,dtype"


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------

def make_layer(case):
    """The layer object equivalent to a functional ``case``.

    Parameters and running statistics are copied into the layer, and the
    layer is put in train / eval mode according to the case.
    """
    import normkit
    kw = case.kwargs
    affine = kw.get("weight") is not None
    eps = kw["eps"]
    name = case.name
    tracking = bool(case.variant.stat_names) and kw.get(case.variant.stat_names[0]) is not None
    if name == "batch_norm":
        layer = normkit.BatchNorm(case.x.shape[case.axis], eps=eps, momentum=kw["momentum"],
                                  affine=affine, track_running_stats=tracking, axis=case.axis)
    elif name == "instance_norm":
        layer = normkit.InstanceNorm(case.x.shape[case.axis], eps=eps, momentum=kw["momentum"],
                                     affine=affine, track_running_stats=tracking, axis=case.axis)
    elif name == "layer_norm":
        layer = normkit.LayerNorm(case.args[0], eps=eps, elementwise_affine=affine)
    elif name == "group_norm":
        layer = normkit.GroupNorm(case.args[0], case.x.shape[case.axis], eps=eps,
                                  affine=affine, axis=case.axis)
    elif name == "batch_renorm":
        layer = normkit.BatchRenorm(case.x.shape[case.axis], eps=eps, momentum=kw["momentum"],
                                    rmax=kw.get("rmax", 3.0), dmax=kw.get("dmax", 5.0),
                                    affine=affine, axis=case.axis)
    else:  # pragma: no cover
        raise AssertionError(name)
    if affine:
        layer.weight[...] = kw["weight"]
        layer.bias[...] = kw["bias"]
    if tracking:
        for key in case.variant.stat_names:
            getattr(layer, key)[...] = kw[key]
    if case.uses_batch_stats:
        assert layer.train() is layer
    else:
        assert layer.eval() is layer
    return layer
