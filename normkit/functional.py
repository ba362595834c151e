"""Functional forward and backward passes of the normalization family.

Semantics follow ``torch.nn.functional``: the batch variance used to
normalize is the biased one, ``running_var`` receives the unbiased one
(times ``n / (n - 1)``, ``n`` values per channel), ``momentum`` is the weight
of the new batch, ``new = (1 - momentum) * old + momentum * batch``, and
``momentum=None`` is a cumulative average (pass ``num_batches_tracked``, the
number of batches already averaged in).  Running statistics are updated in
place, and only after every argument has been checked.

Each function is the scheme of the same name (:mod:`normkit.schemes`) run
on the caller's arrays: it checks its arguments, binds them to the scheme
(:meth:`normkit.Normalizer.bound`, no copies) and runs the scheme's
forward.  There is no second definition of any variant here.

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

Output buffers
--------------
Every forward takes ``out=`` and every backward ``dx_out=``: an array of
the input's shape and dtype, on its side (host or device), writeable, in
any layout, that receives the result and is returned (checked before
anything is computed or running statistics change).  The built-in passes
write it directly when it is C-contiguous (float16 after the float32
kernels, one conversion) and through one copy otherwise.  ``out=x`` works
in place: inference with running statistics is an elementwise map, and
where the statistics come from ``x`` they are complete before ``y`` is
written; but the backward recomputes ``xhat`` from the unmodified ``x``,
so ``out=x`` with ``return_saved=True`` raises.  ``dx_out=dy`` is a
backward in place (the sums are complete before ``dx`` is written)::

    y = batch_norm(x, rm, rv, w, b, out=x)                # inference in place
    y, saved = layer_norm(x, 512, w, b, out=y_buffer, return_saved=True)
    dx, dw, db = layer_norm_backward(dy, x, saved, dx_out=dy)

CUDA device arrays
------------------
Every function also takes CUDA device arrays (Numba device arrays, CuPy
arrays, PyTorch CUDA tensors; see :mod:`normkit.backend`): then all array
arguments must be on the device (mixing raises TypeError), results and
``saved``'s statistics are Numba device arrays, and running statistics are
updated in place on the device.
"""

import math

from .backend import accepts_device_arrays
from .checks import (check_axis, check_channel_input, check_eps, check_input,
                     check_momentum, check_ndim, check_normalized_shape,
                     check_out, check_param, check_positive_int, check_running,
                     check_trailing, overlap)
from .schemes.base import (Saved, check_backward, forward_into, normalize,
                           normalize_backward, written)
from .schemes.batch import BatchNorm, BatchRenorm, GhostBatchNorm
from .schemes.per_sample import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from .schemes.reparam import SpectralNorm, SpectralSaved, WeightNorm, unit_view

#: The records and generic passes (Saved, normalize, normalize_backward)
#: are re-exported here from :mod:`normkit.schemes.base`, where they are
#: documented.
__all__ = [
    "batch_norm", "batch_norm_backward", "instance_norm",
    "instance_norm_backward", "layer_norm", "layer_norm_backward",
    "group_norm", "group_norm_backward", "batch_renorm",
    "batch_renorm_backward", "batch_renorm_schedule", "rms_norm", "rms_norm_backward",
    "ghost_batch_norm", "ghost_batch_norm_backward", "weight_norm",
    "weight_norm_backward", "spectral_norm", "spectral_norm_backward",
]


def _backward_of(forward, example, returns=None):
    """Decorator: the docstring of the backward of ``forward``, with the
    arguments every backward shares, what it returns and ``example``
    (doctest lines after ``x`` is made)."""
    returns = returns or """\
    dx : array
        Gradient with respect to ``x``, of its shape and dtype.
    dweight, dbias : array or None
        Gradients of the weight and bias the forward used, shaped and typed
        like the weight (None where the forward had none)."""
    doc = f"""Backward of :func:`{forward}`.

    See :func:`normkit.normalize_backward` for the formulas.

    Parameters
    ----------
    dy : array
        Gradient with respect to the forward's output, of ``x``'s shape.
    x : array
        The forward's input, unmodified (the backward recomputes
        ``xhat`` from it).
    saved : Saved
        The record returned by ``{forward}(..., return_saved=True)``.
    dx_out : array, optional
        Where to write ``dx``, returned: ``x``'s shape and dtype, on its
        side, writeable, any layout; ``dy`` itself for a backward in
        place.

    Returns
    -------
{returns}

    Raises
    ------
    TypeError, ValueError
        For a record of another forward, or ``dy`` / ``x`` of another
        shape or a non-float dtype.

    See Also
    --------
    {forward} : the forward pass.
    normalize_backward : the generic backward every scheme builds on.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).standard_normal((4, 6, 5))
{example}
    """

    def document(function):
        function.__doc__ = doc
        return function
    return document


def _run(scheme, x, return_saved, out=None, name="x"):
    """The bound scheme's forward, into ``out`` (checked first)."""
    if out is not None:
        check_out(out, x, scheme.label, like_name=name)
        if return_saved and overlap(out, x) != "none":
            raise ValueError(f"{scheme.label}: out is {name} itself, which the "
                             f"backward needs unmodified; with "
                             f"return_saved=True pass another out")
    y, saved = forward_into(scheme, x, out)
    return (y, saved) if return_saved else y


def _running_state(func, momentum, num_batches_tracked, updating, running_mean):
    """The bound scheme's running-statistics settings (momentum checked)."""
    check_momentum(momentum, func, num_batches_tracked, updating)
    return {"momentum": momentum, "track_running_stats": running_mean is not None,
            "num_batches_tracked": (num_batches_tracked or 0) if updating else 0}


# --------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------

@accepts_device_arrays
def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, axis=1, *,
               num_batches_tracked=None, return_saved=False, out=None):
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
    training : bool, default False
    momentum : float in [0, 1] or None, default 0.1
        None: cumulative average ``1 / (num_batches_tracked + 1)``.
    eps : float, default 1e-5
        ``>= 0``; ``> 0`` where the batch statistics are used (training, or
        no running statistics), with PyTorch 2.13's error otherwise.
    axis : int, default 1
        Channel axis: 1 channels-first, -1 channels-last.
    num_batches_tracked : int, optional
        Batches already averaged in, for ``momentum=None``.
    return_saved : bool, default False
        Also return the :class:`Saved` record for the backward.
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : ndarray, or (y, saved)

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    BatchNorm2d : the layer, with its own parameters and running statistics.
    batch_norm_backward : the backward pass.
    normkit.torch.BatchNorm2d

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
    ax, C = check_channel_input(
        func, x, axis, weight, bias,
        running=(("running_mean", running_mean), ("running_var", running_var)))
    eps = check_eps(eps, func)
    updating = bool(training) and running_mean is not None
    scheme = BatchNorm.bound(
        func, training, num_features=C, axis=ax, eps=eps, weight=weight,
        bias=bias, running_mean=running_mean, running_var=running_var,
        **_running_state(func, momentum, num_batches_tracked, updating,
                         running_mean))
    return _run(scheme, x, return_saved, out)


@_backward_of("batch_norm", """\
    >>> y, saved = normkit.batch_norm(x, training=True, return_saved=True)
    >>> dx, dweight, dbias = normkit.batch_norm_backward(np.ones_like(y), x, saved)
    >>> dx.shape
    (4, 6, 5)
""")
def batch_norm_backward(dy, x, saved, *, dx_out=None):
    return normalize_backward(dy, x, saved, "batch_norm", dx_out=dx_out)


# --------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------

@accepts_device_arrays
def instance_norm(x, running_mean=None, running_var=None, weight=None,
                  bias=None, use_input_stats=True, momentum=0.1, eps=1e-5,
                  axis=1, *, num_batches_tracked=None, return_saved=False,
                  out=None):
    """Instance normalization (Ulyanov et al. 2016).

    Per sample ``n`` (axis 0) and channel ``c`` (``axis``), over the other
    axes: ``y = (x - mu_nc) / sqrt(sigma_nc^2 + eps) * gamma_c + beta_c``.
    With ``use_input_stats`` (the default) the statistics are the input's
    own and given running statistics are updated in place with their mean
    over the batch (variance unbiased per instance); otherwise the running
    statistics normalize.

    .. math::

        y_{ncs} = \\frac{x_{ncs} - \\mu_{nc}}{\\sqrt{\\sigma^2_{nc} + \\epsilon}}
                  \\gamma_c + \\beta_c

    Parameters
    ----------
    x : array
        float16, float32 or float64, ``(N, C, S...)`` (``axis=1``) or
        ``(N, S..., C)`` (``axis=-1``), at least 3-D in training.
    running_mean, running_var : array ``(C,)``, optional
        Updated in place when ``use_input_stats``; used to normalize
        otherwise.
    weight, bias : array ``(C,)``, optional
        ``gamma`` and ``beta`` (default 1 and 0).
    use_input_stats : bool, default True
        Normalize with each instance's own statistics.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running update (None: cumulative
        average, with ``num_batches_tracked``).
    eps : float, default 1e-5
    axis : int, default 1
        Channel axis (not 0, the batch axis).
    num_batches_tracked : int, optional
        Batches already averaged in, for ``momentum=None``.
    return_saved : bool, default False
        Also return the :class:`~normkit.Saved` record for the backward.
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    InstanceNorm2d : the layer, with its own parameters and running statistics.
    instance_norm_backward : the backward pass.
    group_norm

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
    ax, C = check_channel_input(
        func, x, axis, weight, bias, min_axis=1,
        running=(("running_mean", running_mean), ("running_var", running_var)))
    if not use_input_stats and running_mean is None:
        raise ValueError(f"{func}: use_input_stats=False needs running_mean "
                         f"and running_var")
    eps = check_eps(eps, func)
    updating = bool(use_input_stats) and running_mean is not None
    scheme = InstanceNorm.bound(
        func, use_input_stats, num_features=C, axis=ax, eps=eps,
        weight=weight, bias=bias, running_mean=running_mean,
        running_var=running_var,
        **_running_state(func, momentum, num_batches_tracked, updating,
                         running_mean))
    return _run(scheme, x, return_saved, out)


@_backward_of("instance_norm", """\
    >>> y, saved = normkit.instance_norm(x, return_saved=True)
    >>> dx, dweight, dbias = normkit.instance_norm_backward(np.ones_like(y), x, saved)
    >>> dx.shape
    (4, 6, 5)
""")
def instance_norm_backward(dy, x, saved, *, dx_out=None):
    return normalize_backward(dy, x, saved, "instance_norm", dx_out=dx_out)


# --------------------------------------------------------------------------
# LayerNorm and RMSNorm
# --------------------------------------------------------------------------

def _trailing_scheme(cls, func, x, normalized_shape, weight, bias, eps):
    check_input(x, "x", func)
    shape = check_normalized_shape(normalized_shape, func)
    check_trailing(func, x.shape, shape)
    for name, value in (("weight", weight), ("bias", bias)):
        check_param(value, name, shape, func)
    return cls.bound(func, True, normalized_shape=shape, weight=weight,
                     bias=bias, eps=eps)


@accepts_device_arrays
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *,
               return_saved=False, out=None):
    """Layer normalization (Ba, Kiros and Hinton 2016).

    Over the trailing ``len(normalized_shape)`` axes of each sample, with
    the mean and biased variance of those ``D`` values,

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\gamma + \\beta

    with ``gamma`` and ``beta`` of shape ``normalized_shape`` (elementwise
    affine).

    Parameters
    ----------
    x : array
        float16, float32 or float64 whose trailing shape is
        ``normalized_shape``.
    normalized_shape : int or tuple of int
    weight, bias : array of shape ``normalized_shape``, optional
        ``gamma`` and ``beta`` (default 1 and 0).
    eps : float, default 1e-5
    return_saved : bool, default False
        Also return the :class:`~normkit.Saved` record for the backward.
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    LayerNorm : the layer, with its own parameters and running statistics.
    layer_norm_backward : the backward pass.
    rms_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (4, 10))
    >>> y = normkit.layer_norm(x, 10)
    >>> bool(np.allclose(y.mean(axis=1), 0.0)), bool(np.allclose(y.var(axis=1), 1.0, atol=1e-4))
    (True, True)
    """
    func = "layer_norm"
    eps = check_eps(eps, func)
    scheme = _trailing_scheme(LayerNorm, func, x, normalized_shape, weight,
                              bias, eps)
    return _run(scheme, x, return_saved, out)


@_backward_of("layer_norm", """\
    >>> y, saved = normkit.layer_norm(x, 5, np.ones(5), np.zeros(5), return_saved=True)
    >>> dx, dweight, dbias = normkit.layer_norm_backward(np.ones_like(y), x, saved)
    >>> dweight.shape
    (5,)
""")
def layer_norm_backward(dy, x, saved, *, dx_out=None):
    return normalize_backward(dy, x, saved, "layer_norm", dx_out=dx_out)


@accepts_device_arrays
def rms_norm(x, normalized_shape, weight=None, eps=None, *, return_saved=False,
             out=None):
    """Root mean square layer normalization (Zhang and Sennrich 2019).

    Over the trailing ``len(normalized_shape)`` axes of each sample, with no
    mean subtraction and no bias,

    .. math::

        y = \\frac{x}{\\sqrt{\\overline{x^2} + \\epsilon}} \\, \\gamma

    with ``gamma`` (``weight``) of shape ``normalized_shape``.  As in
    ``torch.nn.functional.rms_norm``, ``eps=None`` means the machine
    epsilon of ``x.dtype`` (``np.finfo(x.dtype).eps``).

    Parameters
    ----------
    x : ndarray
        float16, float32 or float64.
    normalized_shape : int or tuple of int
        The trailing shape of ``x`` to normalize over.
    weight : ndarray of shape ``normalized_shape``, optional
    eps : float or None
    return_saved : bool
        Also return the :class:`~normkit.Saved` record for the backward.
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    RMSNorm : the layer, with its own parameters and running statistics.
    rms_norm_backward : the backward pass.
    layer_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.array([[3.0, -3.0, 3.0, -3.0]])
    >>> normkit.rms_norm(x, 4, eps=0.0).tolist()
    [[1.0, -1.0, 1.0, -1.0]]
    """
    func = "rms_norm"
    eps = None if eps is None else check_eps(eps, func)
    scheme = _trailing_scheme(RMSNorm, func, x, normalized_shape, weight,
                              None, eps)
    return _run(scheme, x, return_saved, out)


@_backward_of("rms_norm", """\
    >>> y, saved = normkit.rms_norm(x, 5, np.ones(5), return_saved=True)
    >>> dx, dweight = normkit.rms_norm_backward(np.ones_like(y), x, saved)
    >>> dweight.shape
    (5,)
""", returns="""\
    dx : array
        Gradient with respect to ``x``.
    dweight : array or None
        Gradient of the gain (None without one).""")
def rms_norm_backward(dy, x, saved, *, dx_out=None):
    dx, dweight, _ = normalize_backward(dy, x, saved, "rms_norm", dx_out=dx_out)
    return dx, dweight


# --------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------

@accepts_device_arrays
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1, *,
               return_saved=False, out=None):
    """Group normalization (Wu and He 2018).

    The ``C`` channels (``axis``) of each sample are split into
    ``num_groups`` contiguous groups; each group is normalized over its
    channels and all non-batch axes, then ``gamma_c`` and ``beta_c`` are
    applied per channel.  One group is LayerNorm over (C, spatial...) with a
    per-channel affine; ``C`` groups is InstanceNorm.

    .. math::

        y_{ncs} = \\frac{x_{ncs} - \\mu_{ng}}{\\sqrt{\\sigma^2_{ng} + \\epsilon}}
                  \\gamma_c + \\beta_c, \\qquad g = \\lfloor c G / C \\rfloor

    Parameters
    ----------
    x : array
        float16, float32 or float64, at least 2-D, channels on ``axis``.
    num_groups : int
        ``G``, which must divide the number of channels ``C``.
    weight, bias : array ``(C,)``, optional
        Per-channel ``gamma`` and ``beta`` (default 1 and 0).
    eps : float, default 1e-5
    axis : int, default 1
        Channel axis (not 0, the batch axis).
    return_saved : bool, default False
        Also return the :class:`~normkit.Saved` record for the backward.
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    GroupNorm : the layer, with its own parameters and running statistics.
    group_norm_backward : the backward pass.
    layer_norm

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
    ax, C = check_channel_input(func, x, axis, weight, bias, min_axis=1)
    groups = check_positive_int(num_groups, "num_groups", func)
    if C % groups:
        raise ValueError(f"{func}: num_groups must divide the number of "
                         f"channels {C}, got num_groups={groups}")
    eps = check_eps(eps, func)
    scheme = GroupNorm.bound(func, True, num_groups=groups, num_channels=C,
                             axis=ax, eps=eps, weight=weight, bias=bias)
    return _run(scheme, x, return_saved, out)


@_backward_of("group_norm", """\
    >>> y, saved = normkit.group_norm(x, 2, np.ones(6), np.zeros(6), return_saved=True)
    >>> dx, dweight, dbias = normkit.group_norm_backward(np.ones_like(y), x, saved)
    >>> dx.shape, dweight.shape
    ((4, 6, 5), (6,))
""")
def group_norm_backward(dy, x, saved, *, dx_out=None):
    return normalize_backward(dy, x, saved, "group_norm", dx_out=dx_out)


# --------------------------------------------------------------------------
# Batch Renormalization
# --------------------------------------------------------------------------

@accepts_device_arrays
def batch_renorm(x, running_mean, running_std, weight=None, bias=None,
                 training=False, momentum=0.1, eps=1e-5, rmax=3.0, dmax=5.0,
                 axis=1, *, num_batches_tracked=None, return_saved=False,
                 out=None):
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

    Parameters
    ----------
    x : array
        float16, float32 or float64, at least 2-D, channels on ``axis``.
    running_mean, running_std : array ``(C,)``
        Required; updated in place in training.
    weight, bias : array ``(C,)``, optional
        ``gamma`` and ``beta`` (default 1 and 0).
    training : bool, default False
    momentum : float in [0, 1] or None, default 0.1
        None: cumulative average, with ``num_batches_tracked``.
    eps : float, default 1e-5
    rmax : float >= 1, default 3.0
    dmax : float >= 0, default 5.0
        The clips of ``r`` and ``d`` (see :func:`batch_renorm_schedule`).
    axis : int, default 1
        Channel axis: 1 channels-first, -1 channels-last.
    num_batches_tracked : int, optional
        Batches already averaged in, for ``momentum=None``.
    return_saved : bool, default False
        Also return the :class:`~normkit.Saved` record for the backward
        (``saved.r`` and ``saved.d`` hold the corrections).
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    BatchRenorm : the layer, with its own parameters and running statistics.
    batch_renorm_backward : the backward pass.
    batch_renorm_schedule

    Examples
    --------
    With the running statistics equal to the batch's, ``r = 1`` and
    ``d = 0`` and the output is batch normalization's

    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4))
    >>> mean, std = x.mean(axis=0), np.sqrt(x.var(axis=0) + 1e-5)
    >>> y = normkit.batch_renorm(x, mean.copy(), std.copy(), training=True)
    >>> bool(np.allclose(y, normkit.batch_norm(x, training=True)))
    True
    """
    func = "batch_renorm"
    ax, C = check_channel_input(
        func, x, axis, weight, bias, running_required=True,
        running=(("running_mean", running_mean), ("running_std", running_std)))
    eps = check_eps(eps, func)
    scheme = BatchRenorm.bound(
        func, training, num_features=C, axis=ax, eps=eps, weight=weight,
        bias=bias, running_mean=running_mean, running_std=running_std,
        rmax=rmax, dmax=dmax,
        **_running_state(func, momentum, num_batches_tracked, bool(training),
                         running_mean))
    scheme.check_limits()
    return _run(scheme, x, return_saved, out)


@_backward_of("batch_renorm", """\
    >>> y, saved = normkit.batch_renorm(x, np.zeros(6), np.ones(6), np.ones(6), training=True,
    ...                          return_saved=True)
    >>> dx, dweight, dbias = normkit.batch_renorm_backward(np.ones_like(y), x, saved)
    >>> dweight.shape, dbias
    ((6,), None)
""")
def batch_renorm_backward(dy, x, saved, *, dx_out=None):
    return normalize_backward(dy, x, saved, "batch_renorm", dx_out=dx_out)


def batch_renorm_schedule(step, warmup=5000, rmax_step=40000, dmax_step=25000,
                          rmax=3.0, dmax=5.0):
    """The ``(rmax, dmax)`` schedule of Ioffe (2017) at training ``step``.

    Plain batch normalization (``rmax = 1, dmax = 0``) for ``step < warmup``,
    then linear relaxation reaching ``rmax`` at ``rmax_step`` and ``dmax`` at
    ``dmax_step``, constant afterwards.  Use it as
    ``layer.rmax, layer.dmax = batch_renorm_schedule(step)``.

    Parameters
    ----------
    step : int
        Training step (from 0).
    warmup : int, default 5000
        Steps of plain batch normalization.
    rmax_step, dmax_step : int, default 40000 and 25000
        Steps at which ``rmax`` and ``dmax`` reach their final values.
    rmax, dmax : float, default 3.0 and 5.0
        The final values.

    Returns
    -------
    (rmax, dmax) : tuple of float

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


# --------------------------------------------------------------------------
# Ghost BatchNorm
# --------------------------------------------------------------------------

@accepts_device_arrays
def ghost_batch_norm(x, virtual_batch_size, running_mean=None,
                     running_var=None, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5, axis=1, *,
                     num_batches_tracked=None, return_saved=False, out=None):
    """Ghost Batch Normalization (Hoffer, Hubara and Soudry 2017).

    The batch (axis 0) is split into ``N / v`` virtual ("ghost") batches of
    ``v = virtual_batch_size`` consecutive samples, and each is batch
    normalized with its own statistics, per channel ``c`` along ``axis``:

    .. math::

        y = \\frac{x - \\mu_{g,c}}{\\sqrt{\\sigma_{g,c}^2 + \\epsilon}}
            \\gamma_c + \\beta_c

    with the mean and biased variance of ghost batch ``g`` (``n = v * S``
    values per channel, ``S`` the spatial size).  This is done in training,
    and whenever no running statistics are given; ``v`` must then divide
    ``N`` (else ValueError: no ragged last ghost batch).

    Running statistics get **one** update per call, with the mean over the
    ghost batches of their means and of their unbiased variances::

        running_mean <- (1 - f) * running_mean + f * mean_g(mu_g)
        running_var  <- (1 - f) * running_var  + f * mean_g(n/(n-1) sigma_g^2)

    with ``f = momentum`` (``momentum=None``: ``f = 1 / (num_batches_tracked
    + 1)``, a cumulative average over calls).  Inference with running
    statistics is exactly BatchNorm inference, for any batch size:
    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``.
    (To our knowledge Keras' ``BatchNormalization(virtual_batch_size=...)``
    also updates its moving statistics once per step from the ghost
    statistics averaged, but with biased variances.)  Other parameters as in
    :func:`normkit.batch_norm`.

    Parameters
    ----------
    x : array
        float16, float32 or float64, at least 2-D, channels on ``axis``.
    virtual_batch_size : int
        ``v``, samples per ghost batch.
    running_mean, running_var : array ``(C,)``, optional
    weight, bias : array ``(C,)``, optional
    training : bool, default False
    momentum : float in [0, 1] or None, default 0.1
    eps : float, default 1e-5
        ``> 0`` where ghost-batch statistics are used, as in
        :func:`batch_norm`.
    axis : int, default 1
        Channel axis (not 0, the batch axis).
    num_batches_tracked : int, optional
        Batches already averaged in, for ``momentum=None``.
    return_saved : bool, default False
        Also return the :class:`~normkit.Saved` record for the backward.
    out : array, optional
        Where to write the result, which is returned: ``x``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=x``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``x``).

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    GhostBatchNorm : the layer, with its own parameters and running statistics.
    ghost_batch_norm_backward : the backward pass.
    batch_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(1.0, 2.0, (8, 3, 5))
    >>> y = normkit.ghost_batch_norm(x, 4, training=True)
    >>> bool(np.allclose(y[4:].mean(axis=(0, 2)), 0.0))    # second ghost batch
    True
    """
    func = "ghost_batch_norm"
    ax, C = check_channel_input(
        func, x, axis, weight, bias, min_axis=1,
        running=(("running_mean", running_mean), ("running_var", running_var)))
    v = check_positive_int(virtual_batch_size, "virtual_batch_size", func)
    eps = check_eps(eps, func)
    updating = bool(training) and running_mean is not None
    scheme = GhostBatchNorm.bound(
        func, training, num_features=C, axis=ax, eps=eps,
        virtual_batch_size=v, weight=weight, bias=bias,
        running_mean=running_mean, running_var=running_var,
        **_running_state(func, momentum, num_batches_tracked, updating,
                         running_mean))
    return _run(scheme, x, return_saved, out)


@_backward_of("ghost_batch_norm", """\
    >>> y, saved = normkit.ghost_batch_norm(x, 2, training=True, return_saved=True)
    >>> dx, dweight, dbias = normkit.ghost_batch_norm_backward(np.ones_like(y), x, saved)
    >>> dx.shape
    (4, 6, 5)
""")
def ghost_batch_norm_backward(dy, x, saved, *, dx_out=None):
    return normalize_backward(dy, x, saved, "ghost_batch_norm", dx_out=dx_out)


# --------------------------------------------------------------------------
# Weight and Spectral Normalization
# --------------------------------------------------------------------------

@accepts_device_arrays
def weight_norm(v, g, axis=0, *, return_saved=False, out=None):
    """Weight Normalization (Salimans and Kingma 2016).

    .. math::

        w = g \\, \\frac{v}{\\lVert v \\rVert}

    with the norm per output unit: over all axes of ``v`` but ``axis``
    (``axis=0``: the rows of a dense weight ``(out, in)`` or the filters of
    a convolution ``(out, in, kh, kw)``), and one ``g`` per unit.  Computed
    as RMS normalization over that view, ``||v|| = sqrt(n * mean(v**2))``
    (``n`` values per unit), with gain ``g / sqrt(n)`` and ``eps = 0``: a
    unit whose ``v`` is all zero gives NaN.

    Parameters
    ----------
    v : ndarray
        The direction parameter, float16, float32 or float64.
    g : ndarray ``(v.shape[axis],)``
        The magnitude per unit.
    axis : int
    return_saved : bool
        Also return the record for :func:`weight_norm_backward`.
    out : array, optional
        Where to write the result, which is returned: ``v``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=v``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``v``).

    Returns
    -------
    w : array, or (w, saved)

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    WeightNorm : the layer, with its own parameters and running statistics.
    weight_norm_backward : the backward pass.
    spectral_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> v = np.array([[3.0, 4.0], [1.0, 0.0]])
    >>> np.round(normkit.weight_norm(v, np.array([10.0, 2.0])), 12).tolist()
    [[6.0, 8.0], [2.0, 0.0]]
    """
    func = "weight_norm"
    ax, _ = unit_view(v, axis, func)
    check_param(g, "g", (v.shape[ax],), func)
    return _run(WeightNorm.bound(func, True, g=g, axis=ax), v, return_saved,
                out, "v")


def weight_norm_backward(dw, v, saved, *, dx_out=None):
    """Backward of :func:`weight_norm`: ``(dv, dg)``.

    With ``vhat = v / ||v||`` per unit, ``dg = sum(dw * vhat)`` and
    ``dv = g / ||v|| * (dw - vhat * sum(dw * vhat))``: the engine's
    uncentered backward with gain ``g / sqrt(n)``.

    Parameters
    ----------
    dw : array
        Gradient with respect to the normalized weight ``w``.
    v : array
        The forward's input, unmodified.
    saved : Saved
        The record of ``weight_norm(..., return_saved=True)``.
    dx_out : array, optional
        Where to write ``dv``, returned: ``v``'s shape and dtype, on its
        side; ``dw`` itself for a backward in place.

    Returns
    -------
    dv : array
        Gradient with respect to ``v``.
    dg : array
        Gradient with respect to ``g``, float64 ``(units,)``.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> v = np.random.default_rng(0).standard_normal((3, 4))
    >>> w, saved = normkit.weight_norm(v, np.ones(3), return_saved=True)
    >>> dv, dg = normkit.weight_norm_backward(w, v, saved)   # d(|w|^2 / 2)
    >>> np.round(dg, 6).tolist(), bool(np.allclose(dv, 0.0))
    ([1.0, 1.0, 1.0], True)
    """
    return WeightNorm.gradients(dw, v, saved, "weight_norm", dx_out=dx_out)


def spectral_norm(w, u, v, n_power_iterations=1, eps=1e-12, training=True,
                  axis=0, *, return_saved=False, out=None):
    """Spectral Normalization (Miyato et al. 2018): ``w / sigma(w)``.

    ``w`` is seen as the matrix ``W`` of ``w.shape[axis]`` rows (its other
    axes flattened) and ``sigma = u^T W v`` estimates its largest singular
    value.  In training, ``n_power_iterations`` steps of the power method
    first update ``u`` and ``v`` **in place**::

        v <- W^T u / max(||W^T u||, eps);   u <- W v / max(||W v||, eps)

    In inference the stored ``u`` and ``v`` are used as they are.

    Parameters
    ----------
    w : ndarray
        The raw weight, float16, float32 or float64, at least 1-D.
    u : ndarray ``(w.shape[axis],)``
        The power iteration's left vector (float, writeable in training).
    v : ndarray ``(w.size / w.shape[axis],)``
        Its right vector (float, writeable in training).
    n_power_iterations : int >= 1
    eps : float > 0
    training : bool
    axis : int
    return_saved : bool
        Also return the record for :func:`spectral_norm_backward`.
    out : array, optional
        Where to write the result, which is returned: ``w``'s shape and
        dtype, on its side (host or device), writeable, any layout;
        checked before anything is computed or updated.  ``out=w``
        works in place, but not with ``return_saved=True`` (the backward
        needs the unmodified ``w``).

    Returns
    -------
    y : array, ``w / sigma`` in ``w.dtype``, or (y, saved)

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it, what was expected and
        what was given), before any running statistic changes.

    See Also
    --------
    SpectralNorm : the layer, with its own parameters and running statistics.
    spectral_norm_backward : the backward pass.
    weight_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> w = np.diag([4.0, 1.0])
    >>> u, v = np.array([0.6, 0.8]), np.array([0.8, 0.6])
    >>> y = normkit.spectral_norm(w, u, v, n_power_iterations=10)
    >>> np.round(y, 4).tolist(), np.round(u, 4).tolist()
    ([[1.0, 0.0], [0.0, 0.25]], [1.0, 0.0])
    """
    func = "spectral_norm"
    check_input(w, "w", func)
    check_ndim(w, func, min_ndim=1, name="w")
    ax = check_axis(axis, w.ndim, func)
    rows = w.shape[ax]
    check_vector = check_running if training else check_param
    check_vector(u, "u", (rows,), func)
    check_vector(v, "v", (math.prod(w.shape[:ax] + w.shape[ax + 1:]),), func)
    n_iter = check_positive_int(n_power_iterations, "n_power_iterations", func)
    eps = check_eps(eps, func)
    if eps == 0.0:
        raise ValueError(f"{func}: eps must be > 0, got 0.0")
    scheme = SpectralNorm.bound(func, training, weight_shape=w.shape, axis=ax,
                                u=u, v=v, n_power_iterations=n_iter, eps=eps)
    return _run(scheme, w, return_saved, out, "w")


def spectral_norm_backward(dy, w, saved, *, dx_out=None):
    """Backward of :func:`spectral_norm`: ``dw``.

    ``u`` and ``v`` are constants (as in the paper and in PyTorch), so with
    ``sigma = u^T W v`` and ``W_sn = W / sigma``::

        dW = (dY - <dY, W_sn> u v^T) / sigma

    Parameters
    ----------
    dy : array
        Gradient with respect to the normalized weight.
    w : array
        The forward's input, unmodified.
    saved : SpectralSaved
        The record of ``spectral_norm(..., return_saved=True)``.
    dx_out : array, optional
        Where to write ``dw``, returned: ``w``'s shape and dtype.

    Returns
    -------
    dw : array, shape and dtype of ``w``

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> w = np.diag([2.0, 1.0])
    >>> u, v = np.array([1.0, 0.0]), np.array([1.0, 0.0])
    >>> y, saved = normkit.spectral_norm(w, u, v, training=False,
    ...                                  return_saved=True)
    >>> normkit.spectral_norm_backward(np.eye(2), w, saved).tolist()
    [[-0.25, 0.0], [0.0, 0.5]]
    """
    if dx_out is None:
        check_backward("spectral_norm_backward", dy, w, saved, SpectralSaved)
        return SpectralNorm.gradients(dy, w, saved)
    dy, w, dx_out = check_backward("spectral_norm_backward", dy, w, saved,
                                   SpectralSaved, dx_out)
    return written(dx_out, SpectralNorm.gradients(dy, w, saved))
