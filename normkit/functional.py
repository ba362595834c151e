"""Functional forward and backward passes of the normalization family.

Semantics follow ``torch.nn.functional``: the batch variance used to
normalize is the biased one, ``running_var`` receives the unbiased one
(times ``n / (n - 1)``, ``n`` values per channel), ``momentum`` is the weight
of the new batch, ``new = (1 - momentum) * old + momentum * batch``, and
``momentum=None`` is a cumulative average (pass ``num_batches_tracked``, the
number of batches already averaged in).  Running statistics are updated in
place, and only after every argument has been checked.

Forward and backward
--------------------
Every forward accepts ``return_saved=True`` and then returns ``(y, saved)``.
``saved`` is a :class:`Saved` record holding the per-group ``mean`` and
inverse standard deviation ``rstd`` the forward used (float64, shape
``(P, K)`` of the engine's view), a reference to ``weight`` and, for Batch
Renormalization, ``r`` and ``d``.  It never holds a copy of the normalized
input: the backward recomputes ``xhat = (x - mean) * rstd`` from ``x``, so
pass the same, unmodified ``x``::

    y, saved = batch_norm(x, rm, rv, w, b, training=True, return_saved=True)
    dx, dw, db = batch_norm_backward(dy, x, saved)

CUDA device arrays
------------------
Every function also takes CUDA device arrays (Numba device arrays, CuPy
arrays, PyTorch CUDA tensors; see :mod:`normkit._device`): then all array
arguments must be on the device (mixing raises TypeError), results and
``saved``'s statistics are Numba device arrays, and running statistics are
updated in place on the device.
"""

from dataclasses import dataclass
import math

import numpy as np

from . import _device, engine
from ._checks import (check_axis, check_eps, check_input, check_momentum,
                      check_ndim, check_param, check_positive_int,
                      check_running, is_int, is_real)

__all__ = [
    "Saved", "batch_norm", "batch_norm_backward", "instance_norm",
    "instance_norm_backward", "layer_norm", "layer_norm_backward",
    "group_norm", "group_norm_backward", "batch_renorm",
    "batch_renorm_backward", "batch_renorm_schedule", "normalize",
    "normalize_backward",
]


@dataclass(frozen=True)
class Saved:
    """What a forward pass hands its backward pass.

    Attributes
    ----------
    variant : str
        Name of the forward function that produced it.
    view : engine.View
        The canonical view of the input.
    shape : tuple of int
        Shape of the input.
    mean, rstd : ndarray, ``(P, K)`` float64
        Statistics used to normalize: ``xhat = (x - mean) * rstd``.
    batch_stats : bool
        True when ``mean`` and ``rstd`` came from the input itself, so the
        gradient flows through them.
    weight : ndarray or None
        The weight used (a reference, not a copy).
    has_bias : bool
        Whether a bias was used (its gradient is returned then).
    r, d : ndarray ``(K * J,)`` or None
        Batch Renormalization's corrections, constants of the backward.
    centered : bool
        False when the statistics were taken about zero (RMS
        normalization): ``mean`` is 0 and ``xhat = x * rstd``.
    """

    variant: str
    view: engine.View
    shape: tuple
    mean: np.ndarray
    rstd: np.ndarray
    batch_stats: bool
    weight: np.ndarray | None
    has_bias: bool
    r: np.ndarray | None = None
    d: np.ndarray | None = None
    centered: bool = True


def _values_per_channel_error(x):
    return ValueError("Expected more than 1 value per channel when training, "
                      f"got input size {tuple(x.shape)}")


def _check_channel_input(func, x, axis, weight, bias, min_axis=0,
                         running=(), running_required=False):
    """Validate a channel-axis variant's input and per-channel arrays.

    ``running`` holds ``(name, array)`` pairs of running statistics: all or
    none must be given (all when ``running_required``).  Returns the
    normalized axis and the number of channels.
    """
    check_input(x, "x", func)
    check_ndim(x, func, min_ndim=2)
    ax = check_axis(axis, x.ndim, func, min_axis=min_axis)
    C = x.shape[ax]
    for name, value in (("weight", weight), ("bias", bias)):
        check_param(value, name, (C,), func)
    for name, value in running:
        if value is None and running_required:
            raise ValueError(f"{func}: {name} is required, got None")
        check_running(value, name, (C,), func)
    if len({value is None for _, value in running}) > 1:
        names = " and ".join(name for name, _ in running)
        raise ValueError(f"{func}: give both {names} or neither")
    return ax, C


# --------------------------------------------------------------------------
# the generic path: any view, statistics of the input itself
# --------------------------------------------------------------------------

@_device.accepts_device_arrays
def normalize(x, view, weight=None, bias=None, eps=1e-5, *, return_saved=False,
              variant="normalize", centered=True):
    """Normalize ``x`` over an engine :class:`~normkit.engine.View`.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the mean and
    biased variance of each ``(p, k)`` group of the view, and ``weight`` and
    ``bias`` of ``K * J`` values (any shape of that size).  This is the
    building block of every variant and the entry point for new schemes
    that only declare a view.

    Parameters
    ----------
    x : ndarray
        float16, float32 or float64 input of ``view.P * ... * view.B`` values.
    view : engine.View
    weight, bias : ndarray, optional
    eps : float
    return_saved : bool
        Also return the :class:`Saved` record for :func:`normalize_backward`.
    centered : bool
        False normalizes by the root mean square about zero instead,
        ``y = x / sqrt(mean(x**2) + eps) * weight + bias`` (RMSNorm).
    """
    y, saved, _ = _normalize_batch(x, view, weight, bias, eps, variant,
                                   centered)
    return (y, saved) if return_saved else y


def _normalize_batch(x, view, weight, bias, eps, variant, centered=True):
    """:func:`normalize`, also returning the biased variance ``(P, K)``
    (the mean square when not ``centered``)."""
    y, mean, var = engine.normalize_batch(x, view, weight, bias, eps, centered)
    saved = Saved(variant, view, x.shape, mean, _device.rstd(var, eps), True,
                  weight, bias is not None, centered=centered)
    return y, saved, var


@_device.accepts_device_arrays
def normalize_backward(dy, x, saved, variant=None):
    """Backward of any forward pass: ``(dx, dweight, dbias)``.

    With ``g = weight * r * dy`` (``r = 1`` except in Batch Renormalization)
    and ``n`` values per group, when the statistics came from the batch

    .. math::

        dx = rstd \\, (g - \\overline{g} - \\hat{x} \\, \\overline{g \\hat{x}})

    (without the ``mean(g)`` term when the statistics were taken
    about zero, ``saved.centered`` false) and ``dx = g * rstd`` for fixed
    statistics; ``dweight = sum(dy * xhat)``
    (Batch Renormalization: ``sum(dy * (xhat * r + d))``) and
    ``dbias = sum(dy)`` over everything but the parameters' axes.
    """
    func = f"{variant or saved.variant}_backward"
    if not isinstance(saved, Saved):
        raise TypeError(f"{func}: saved must be the Saved record returned by "
                        f"the forward with return_saved=True, got "
                        f"{type(saved).__name__}")
    if variant is not None and saved.variant != variant:
        raise ValueError(f"{func}: saved comes from {saved.variant}, not "
                         f"{variant}")
    _device.same_device(func, {"x": x, "saved.mean": saved.mean})
    check_input(x, "x", func)
    check_input(dy, "dy", func)
    if x.shape != saved.shape:
        raise ValueError(f"{func}: x must have the forward input's shape "
                         f"{saved.shape}, got {x.shape}")
    if dy.shape != saved.shape:
        raise ValueError(f"{func}: dy must have shape {saved.shape}, got "
                         f"{dy.shape}")
    weight = saved.weight
    need_affine = weight is not None or saved.has_bias
    dx, sum_dy, sum_dy_xhat = engine.backward(
        dy, x, saved.view, saved.mean, saved.rstd,
        _device.gscale(weight, saved.r), saved.batch_stats, need_affine,
        saved.centered)
    dweight = dbias = None
    if weight is not None:
        if saved.r is not None:
            sum_dy_xhat = _device.renorm_dweight(sum_dy_xhat, sum_dy, saved.r,
                                                 saved.d)
        dweight = _device.cast(sum_dy_xhat, weight.shape, weight.dtype)
    if saved.has_bias:
        shape = weight.shape if weight is not None else (sum_dy.size,)
        dtype = weight.dtype if weight is not None else x.dtype
        dbias = _device.cast(sum_dy, shape, dtype)
    return dx, dweight, dbias


# --------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------

@_device.accepts_device_arrays
def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, axis=1, *,
               num_batches_tracked=None, return_saved=False):
    """Batch normalization (Ioffe and Szegedy 2015).

    Per channel ``c`` along ``axis``, over all other axes,

    .. math::

        y = \\frac{x - \\mu_c}{\\sqrt{\\sigma_c^2 + \\epsilon}} \\gamma_c + \\beta_c

    with the batch mean and biased variance when ``training`` is true or no
    running statistics are given, else ``running_mean`` / ``running_var``.
    In training, given running statistics are updated in place with the
    unbiased batch variance ``n / (n - 1) * sigma^2``.

    Parameters
    ----------
    x : ndarray
        float16, float32 or float64, at least 2-D, channels on ``axis``.
    running_mean, running_var : ndarray ``(C,)``, optional
    weight, bias : ndarray ``(C,)``, optional
    training : bool
    momentum : float in [0, 1] or None
        None: cumulative average ``1 / (num_batches_tracked + 1)``.
    eps : float
    axis : int
        Channel axis: 1 channels-first, -1 channels-last.
    num_batches_tracked : int, optional
        Batches already averaged in, for ``momentum=None``.
    return_saved : bool
        Also return the :class:`Saved` record for the backward.

    Returns
    -------
    y : ndarray, or (y, saved)

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5, 5))
    >>> running_mean, running_var = np.zeros(4), np.ones(4)
    >>> y = normkit.batch_norm(x, running_mean, running_var, training=True)
    >>> bool(np.allclose(y.mean(axis=(0, 2, 3)), 0.0))
    True
    >>> bool(np.allclose(running_mean, 0.1 * x.mean(axis=(0, 2, 3))))
    True
    """
    func = "batch_norm"
    ax, C = _check_channel_input(
        func, x, axis, weight, bias,
        running=(("running_mean", running_mean), ("running_var", running_var)))
    eps = check_eps(eps, func)
    updating = bool(training) and running_mean is not None
    factor = check_momentum(momentum, func, num_batches_tracked, updating)
    n = x.size // C
    if training and n <= 1:
        raise _values_per_channel_error(x)
    view = engine.channel_view(x.shape, ax, per_sample=False)
    if training or running_mean is None:
        y, saved, var = _normalize_batch(x, view, weight, bias, eps, func)
        if updating:
            _device.update_running(running_mean, saved.mean, factor)
            _device.update_running(running_var, var, factor, n)
    else:
        mean = _device.as_float64(running_mean).reshape(1, C)
        rstd = _device.rstd(running_var, eps).reshape(1, C)
        y = engine.apply_affine(x, view, mean, rstd, weight, bias)
        saved = Saved(func, view, x.shape, mean, rstd, False, weight,
                      bias is not None)
    return (y, saved) if return_saved else y


def batch_norm_backward(dy, x, saved):
    """Backward of :func:`batch_norm`: ``(dx, dweight, dbias)``.

    See :func:`normalize_backward` for the formulas; ``saved`` is the record
    returned by ``batch_norm(..., return_saved=True)``.
    """
    return normalize_backward(dy, x, saved, "batch_norm")


# --------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------

@_device.accepts_device_arrays
def instance_norm(x, running_mean=None, running_var=None, weight=None,
                  bias=None, use_input_stats=True, momentum=0.1, eps=1e-5,
                  axis=1, *, num_batches_tracked=None, return_saved=False):
    """Instance normalization (Ulyanov et al. 2016).

    Per sample ``n`` (axis 0) and channel ``c`` (``axis``), over the other
    axes: ``y = (x - mu_nc) / sqrt(sigma_nc^2 + eps) * gamma_c + beta_c``.
    With ``use_input_stats`` (the default) the statistics are the input's
    own and given running statistics are updated in place with their mean
    over the batch (variance unbiased per instance); otherwise the running
    statistics normalize.  Parameters as in :func:`batch_norm`.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (2, 4, 6, 6))
    >>> y = normkit.instance_norm(x)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0.0))   # per sample and channel
    True
    """
    func = "instance_norm"
    ax, C = _check_channel_input(
        func, x, axis, weight, bias, min_axis=1,
        running=(("running_mean", running_mean), ("running_var", running_var)))
    if not use_input_stats and running_mean is None:
        raise ValueError(f"{func}: use_input_stats=False needs running_mean "
                         f"and running_var")
    eps = check_eps(eps, func)
    updating = bool(use_input_stats) and running_mean is not None
    factor = check_momentum(momentum, func, num_batches_tracked, updating)
    view = engine.channel_view(x.shape, ax, per_sample=True)
    n = view.group_size
    if use_input_stats and n <= 1:
        raise ValueError("Expected more than 1 spatial element when training, "
                         f"got input size {tuple(x.shape)}")
    if use_input_stats:
        y, saved, var = _normalize_batch(x, view, weight, bias, eps, func)
        if updating:
            _device.update_running(running_mean, saved.mean, factor)
            _device.update_running(running_var, var, factor, n)
    else:
        mean = _device.rows(_device.as_float64(running_mean), view.P)
        rstd = _device.rows(_device.rstd(running_var, eps), view.P)
        y = engine.apply_affine(x, view, mean, rstd, weight, bias)
        saved = Saved(func, view, x.shape, mean, rstd, False, weight,
                      bias is not None)
    return (y, saved) if return_saved else y


def instance_norm_backward(dy, x, saved):
    """Backward of :func:`instance_norm`: ``(dx, dweight, dbias)``."""
    return normalize_backward(dy, x, saved, "instance_norm")


# --------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------

def _normalized_shape(normalized_shape, func):
    if is_int(normalized_shape):
        normalized_shape = (normalized_shape,)
    try:
        shape = tuple(int(d) for d in normalized_shape)
    except TypeError:
        raise TypeError(f"{func}: normalized_shape must be an int or a tuple "
                        f"of ints, got {normalized_shape!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"{func}: normalized_shape must be a non-empty tuple "
                         f"of positive ints, got {normalized_shape!r}")
    return shape


def _trailing_input(func, x, normalized_shape, weight, bias=None):
    """Validate the input of a variant over the trailing ``normalized_shape``
    axes and its per-element ``weight`` and ``bias``; return its view."""
    check_input(x, "x", func)
    shape = _normalized_shape(normalized_shape, func)
    if x.ndim < len(shape) or x.shape[x.ndim - len(shape):] != shape:
        raise ValueError(f"{func}: normalized_shape {shape} must match the "
                         f"trailing dimensions of x, got input shape {x.shape}")
    for name, value in (("weight", weight), ("bias", bias)):
        check_param(value, name, shape, func)
    return engine.trailing_view(x.shape, len(shape))


@_device.accepts_device_arrays
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *,
               return_saved=False):
    """Layer normalization (Ba, Kiros and Hinton 2016).

    Over the trailing ``len(normalized_shape)`` axes of each sample:
    ``y = (x - mu) / sqrt(sigma^2 + eps) * gamma + beta`` with ``gamma`` and
    ``beta`` of shape ``normalized_shape`` (elementwise affine).
    """
    func = "layer_norm"
    view = _trailing_input(func, x, normalized_shape, weight, bias)
    eps = check_eps(eps, func)
    return normalize(x, view, weight, bias, eps, return_saved=return_saved,
                     variant=func)


def layer_norm_backward(dy, x, saved):
    """Backward of :func:`layer_norm`: ``(dx, dweight, dbias)``."""
    return normalize_backward(dy, x, saved, "layer_norm")


# --------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------

@_device.accepts_device_arrays
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1, *,
               return_saved=False):
    """Group normalization (Wu and He 2018).

    The ``C`` channels (``axis``) of each sample are split into
    ``num_groups`` contiguous groups; each group is normalized over its
    channels and all non-batch axes, then ``gamma_c`` and ``beta_c`` are
    applied per channel.  One group is LayerNorm over (C, spatial...) with a
    per-channel affine; ``C`` groups is InstanceNorm.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).standard_normal((2, 8, 4, 4))
    >>> y = normkit.group_norm(x, num_groups=2)
    >>> groups = y.reshape(2, 2, -1)          # (sample, group, values)
    >>> bool(np.allclose(groups.mean(axis=-1), 0.0))
    True
    >>> bool(np.allclose(normkit.group_norm(x, 8), normkit.instance_norm(x)))
    True
    """
    func = "group_norm"
    ax, C = _check_channel_input(func, x, axis, weight, bias, min_axis=1)
    groups = check_positive_int(num_groups, "num_groups", func)
    if C % groups:
        raise ValueError(f"{func}: num_groups must divide the number of "
                         f"channels {C}, got num_groups={groups}")
    eps = check_eps(eps, func)
    view = engine.channel_view(x.shape, ax, per_sample=True, groups=groups)
    return normalize(x, view, weight, bias, eps, return_saved=return_saved,
                     variant=func)


def group_norm_backward(dy, x, saved):
    """Backward of :func:`group_norm`: ``(dx, dweight, dbias)``."""
    return normalize_backward(dy, x, saved, "group_norm")


# --------------------------------------------------------------------------
# Batch Renormalization
# --------------------------------------------------------------------------

@_device.accepts_device_arrays
def batch_renorm(x, running_mean, running_std, weight=None, bias=None,
                 training=False, momentum=0.1, eps=1e-5, rmax=3.0, dmax=5.0,
                 axis=1, *, num_batches_tracked=None, return_saved=False):
    """Batch Renormalization (Ioffe 2017, Algorithm 1).

    In training, per channel with the batch mean ``mu_B`` and biased
    variance ``var_B``::

        sigma_B = sqrt(var_B + eps)
        r = clip(sigma_B / running_std, 1/rmax, rmax)
        d = clip((mu_B - running_mean) / running_std, -dmax, dmax)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    ``r`` and ``d`` come from the running values before this step's update
    and are constants for the backward; then, in place,
    ``running_mean += momentum * (mu_B - running_mean)`` and
    ``running_std += momentum * (sigma_B - running_std)``.  In inference
    ``y = gamma * (x - running_mean) / running_std + beta``.  With
    ``rmax=1, dmax=0`` training is plain batch normalization.

    Examples
    --------
    With the running statistics equal to the batch's, ``r = 1`` and
    ``d = 0`` and the output is batch normalization's:

    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4))
    >>> mean, std = x.mean(axis=0), np.sqrt(x.var(axis=0) + 1e-5)
    >>> y = normkit.batch_renorm(x, mean.copy(), std.copy(), training=True)
    >>> bool(np.allclose(y, normkit.batch_norm(x, training=True)))
    True
    """
    func = "batch_renorm"
    ax, C = _check_channel_input(
        func, x, axis, weight, bias, running_required=True,
        running=(("running_mean", running_mean), ("running_std", running_std)))
    eps = check_eps(eps, func)
    for name, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if not is_real(value) or not math.isfinite(value) or value < low:
            raise ValueError(f"{func}: {name} must be a finite number >= {low}, "
                             f"got {value!r}")
    factor = check_momentum(momentum, func, num_batches_tracked, bool(training))
    view = engine.channel_view(x.shape, ax, per_sample=False)
    if not training:
        rstd = _device.reciprocal(running_std).reshape(1, C)
        mean = _device.as_float64(running_mean).reshape(1, C)
        y = engine.apply_affine(x, view, mean, rstd, weight, bias)
        saved = Saved(func, view, x.shape, mean, rstd, False, weight,
                      bias is not None)
        return (y, saved) if return_saved else y
    if x.size // C <= 1:
        raise _values_per_channel_error(x)
    mean, var = engine.moments(x, view)
    alpha, rstd, beta, r, d = _device.renorm(mean, var, running_mean,
                                             running_std, weight, bias, eps,
                                             rmax, dmax, factor)
    y = engine.apply_affine(x, view, mean, alpha, weight, beta)
    saved = Saved(func, view, x.shape, mean, rstd, True, weight,
                  bias is not None, r, d)
    return (y, saved) if return_saved else y


def batch_renorm_backward(dy, x, saved):
    """Backward of :func:`batch_renorm`: ``(dx, dweight, dbias)``.

    ``r`` and ``d`` are constants: in training ``g = weight * r * dy`` in
    :func:`normalize_backward`'s formula and
    ``dweight = sum(dy * (xhat * r + d))``.
    """
    return normalize_backward(dy, x, saved, "batch_renorm")


def batch_renorm_schedule(step, warmup=5000, rmax_step=40000, dmax_step=25000,
                          rmax=3.0, dmax=5.0):
    """The ``(rmax, dmax)`` schedule of Ioffe (2017) at training ``step``.

    Plain batch normalization (``rmax = 1, dmax = 0``) for ``step < warmup``,
    then linear relaxation reaching ``rmax`` at ``rmax_step`` and ``dmax`` at
    ``dmax_step``, constant afterwards.  Use it as
    ``layer.rmax, layer.dmax = batch_renorm_schedule(step)``.

    Examples
    --------
    >>> import normkit
    >>> normkit.batch_renorm_schedule(0)
    (1.0, 0.0)
    >>> normkit.batch_renorm_schedule(15000)
    (1.5714285714285714, 2.5)
    >>> normkit.batch_renorm_schedule(10**6)
    (3.0, 5.0)
    """
    if step < warmup:
        return 1.0, 0.0

    def ramp(end, top, bottom):
        if end <= warmup:
            return float(top)
        frac = min(1.0, (step - warmup) / (end - warmup))
        return bottom + frac * (top - bottom)

    return ramp(rmax_step, rmax, 1.0), ramp(dmax_step, dmax, 0.0)
