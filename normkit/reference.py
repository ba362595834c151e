"""Plain float64 NumPy reference implementations of the normalization layers.

These functions are written directly from the textbook formulas and are meant
as an oracle for testing the optimized engine.  They are deliberately simple:
every input is converted to ``float64``, arguments are never modified, and the
results are fresh ``float64`` arrays.

Conventions shared by all functions:

* ``axis`` is the channel axis (negative values allowed; ``axis=-1`` is the
  channels-last layout).  The batch axis is always 0.
* ``xhat`` denotes the normalized input ``(x - mean) / sqrt(var + eps)``; the
  quantity ``rstd = 1 / sqrt(var + eps)`` is its inverse standard deviation.
* Backward functions return ``(dx, dweight, dbias)``; ``dweight`` / ``dbias``
  are ``None`` when ``weight`` / ``bias`` is ``None``.
* Inputs without values (a dimension of size 0) give empty outputs, sums
  over no values are 0, and, as in PyTorch, an empty batch leaves the
  running statistics alone.  A group of zero variance with ``eps = 0``
  gives NaN (``0 * inf``), as IEEE arithmetic does.
"""

import math

import numpy as np

__all__ = [
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "batch_renorm",
    "batch_norm_backward",
    "instance_norm_backward",
    "layer_norm_backward",
    "group_norm_backward",
    "batch_renorm_backward",
    "rms_norm",
    "rms_norm_backward",
    "ghost_batch_norm",
    "ghost_batch_norm_backward",
    "weight_norm",
    "weight_norm_backward",
    "spectral_norm",
    "spectral_norm_backward",
]


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _f64(a):
    """Return a float64 copy of ``a`` (or ``None``)."""
    if a is None:
        return None
    return np.array(a, dtype=np.float64, copy=True)


def _channel_axis(axis, ndim):
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for an array of ndim {ndim}")
    return axis % ndim


def _per_channel_2d(x, axis):
    """View ``x`` as ``(n, C)``: one column per channel, ``n`` values each."""
    moved = np.moveaxis(x, axis, -1)
    return (moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1]),
            moved.shape)


def _from_per_channel_2d(a, moved_shape, axis):
    """Inverse of :func:`_per_channel_2d`."""
    return np.moveaxis(a.reshape(moved_shape), -1, axis)


def _per_instance_3d(x, axis):
    """View ``x`` as ``(N, C, M)``: batch, channel, remaining values."""
    if axis == 0:
        raise ValueError("the channel axis must differ from the batch axis 0")
    moved = np.moveaxis(x, axis, 1)
    n, c = moved.shape[:2]
    return moved.reshape(n, c, math.prod(moved.shape[2:])), moved.shape


def _from_per_instance_3d(a, moved_shape, axis):
    """Inverse of :func:`_per_instance_3d`."""
    return np.moveaxis(a.reshape(moved_shape), 1, axis)


def _affine(xhat, weight, bias):
    """``xhat * w + b`` where ``w``/``b`` broadcast along the last axis."""
    y = xhat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _norm_input_grad(g, xhat, rstd, reduce_axes):
    """Gradient of ``xhat`` with batch statistics, given ``g = dL/dxhat``.

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), the means taken over
    each statistics group (``reduce_axes``).
    """
    mean_g = g.mean(axis=reduce_axes, keepdims=True)
    mean_gx = (g * xhat).mean(axis=reduce_axes, keepdims=True)
    return rstd * (g - mean_g - xhat * mean_gx)


def _momentum_factor(momentum, num_batches_tracked):
    """Weight of the new batch in the running average."""
    if momentum is None:
        seen = 0 if num_batches_tracked is None else int(num_batches_tracked)
        return 1.0 / (seen + 1)
    return float(momentum)


def _param_grads(dy, xhat, weight, bias, axes):
    dweight = None if weight is None else (dy * xhat).sum(axis=axes)
    dbias = None if bias is None else dy.sum(axis=axes)
    return dweight, dbias


# ---------------------------------------------------------------------------
# batch normalization
# ---------------------------------------------------------------------------

def _batch_norm_stats(xc, running_mean, running_var, training, eps):
    """Return ``(mean, rstd, use_batch)`` for the ``(n, C)`` view ``xc``."""
    use_batch = training or running_mean is None or running_var is None
    if use_batch:
        mean = xc.mean(axis=0)
        var = xc.var(axis=0)  # biased
    else:
        mean = running_mean
        var = running_var
    return mean, 1.0 / np.sqrt(var + eps), use_batch


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, axis=1,
               num_batches_tracked=None):
    """Batch normalization (PyTorch semantics).

    For every channel ``c`` (along ``axis``) with statistics taken over all
    other axes::

        y = (x - mu_c) / sqrt(var_c + eps) * w_c + b_c

    In training mode, or when no running statistics are given, ``mu_c`` and
    ``var_c`` are the batch mean and the *biased* batch variance.  Otherwise
    the running statistics are used.

    When ``training`` is true and running statistics are given they are
    updated (on copies) as::

        new = (1 - f) * old + f * batch

    where the batch variance is the *unbiased* one (factor ``n / (n - 1)``,
    ``n`` values per channel) and ``f = momentum``, or, if ``momentum`` is
    ``None``, ``f = 1 / (num_batches_tracked + 1)`` (cumulative average;
    ``num_batches_tracked`` counts the batches averaged in before this one).

    Parameters
    ----------
    x : array_like
        Input with channel axis ``axis``.
    running_mean, running_var : array_like of shape (C,), optional
        Running statistics.  They are not modified.
    weight, bias : array_like of shape (C,), optional
        Affine parameters.
    training : bool
        Use batch statistics and update the running ones.
    momentum : float or None
    eps : float
    axis : int
        Channel axis.
    num_batches_tracked : int, optional
        Only used when ``momentum`` is ``None``.

    Returns
    -------
    y : ndarray
    new_running_mean, new_running_var : ndarray or None
        Updated running statistics (``None`` where not given).
    """
    x = _f64(x)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    weight, bias = _f64(weight), _f64(bias)
    ax = _channel_axis(axis, x.ndim)
    xc, moved_shape = _per_channel_2d(x, ax)
    n = xc.shape[0]

    mean, rstd, _ = _batch_norm_stats(xc, running_mean, running_var, training, eps)
    y = _affine((xc - mean) * rstd, weight, bias)
    y = _from_per_channel_2d(y, moved_shape, ax)

    new_rm, new_rv = running_mean, running_var
    if training and n > 0:
        f = _momentum_factor(momentum, num_batches_tracked)
        if running_mean is not None:
            new_rm = (1.0 - f) * running_mean + f * xc.mean(axis=0)
        if running_var is not None:
            unbiased = xc.var(axis=0) * n / (n - 1)
            new_rv = (1.0 - f) * running_var + f * unbiased
    return y, new_rm, new_rv


def batch_norm_backward(dy, x, running_mean=None, running_var=None, weight=None,
                        bias=None, training=False, eps=1e-5, axis=1):
    """Gradients of :func:`batch_norm` given the output gradient ``dy``.

    With ``g = dy * w`` and ``xhat`` the normalized input, per channel over
    its ``n`` values:

    * batch statistics: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``
    * running statistics: ``dx = dy * w * rstd``

    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over all axes but
    the channel axis.

    Returns
    -------
    dx, dweight, dbias : ndarray (``dweight``/``dbias`` ``None`` if absent)
    """
    x, dy = _f64(x), _f64(dy)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    weight, bias = _f64(weight), _f64(bias)
    ax = _channel_axis(axis, x.ndim)
    xc, moved_shape = _per_channel_2d(x, ax)
    dyc, _ = _per_channel_2d(dy, ax)

    mean, rstd, use_batch = _batch_norm_stats(xc, running_mean, running_var,
                                              training, eps)
    xhat = (xc - mean) * rstd
    g = dyc if weight is None else dyc * weight
    if use_batch:
        dxc = _norm_input_grad(g, xhat, rstd, reduce_axes=0)
    else:
        dxc = g * rstd
    dweight, dbias = _param_grads(dyc, xhat, weight, bias, axes=0)
    return _from_per_channel_2d(dxc, moved_shape, ax), dweight, dbias


# ---------------------------------------------------------------------------
# instance normalization
# ---------------------------------------------------------------------------

def _instance_norm_stats(xi, running_mean, running_var, use_input_stats, eps):
    """Return ``(mean, rstd, use_batch)`` broadcastable to ``(N, C, M)``."""
    use_batch = use_input_stats or running_mean is None or running_var is None
    if use_batch:
        mean = xi.mean(axis=2, keepdims=True)
        var = xi.var(axis=2, keepdims=True)  # biased
    else:
        mean = running_mean[None, :, None]
        var = running_var[None, :, None]
    return mean, 1.0 / np.sqrt(var + eps), use_batch


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1,
                  num_batches_tracked=None):
    """Instance normalization (PyTorch semantics).

    For every sample ``n`` (axis 0) and channel ``c`` (``axis``), statistics
    over the remaining axes::

        y = (x - mu_nc) / sqrt(var_nc + eps) * w_c + b_c

    with the biased per-instance variance.  If ``use_input_stats`` is false
    (and running statistics are given) the running statistics ``mu_c`` /
    ``var_c`` are used instead.

    When ``use_input_stats`` is true and running statistics are given they
    are updated (on copies) as ``new = (1 - f) * old + f * batch`` where the
    batch value for channel ``c`` is the mean over samples of the
    per-instance mean, respectively of the per-instance *unbiased* variance;
    ``f`` is chosen as in :func:`batch_norm`.

    Returns
    -------
    y : ndarray
    new_running_mean, new_running_var : ndarray or None
    """
    x = _f64(x)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    weight, bias = _f64(weight), _f64(bias)
    ax = _channel_axis(axis, x.ndim)
    xi, moved_shape = _per_instance_3d(x, ax)
    m = xi.shape[2]

    mean, rstd, _ = _instance_norm_stats(xi, running_mean, running_var,
                                         use_input_stats, eps)
    xhat = (xi - mean) * rstd
    w = None if weight is None else weight[None, :, None]
    b = None if bias is None else bias[None, :, None]
    y = _affine(xhat, w, b)
    y = _from_per_instance_3d(y, moved_shape, ax)

    new_rm, new_rv = running_mean, running_var
    if use_input_stats and xi.shape[0] > 0 and m > 0:
        f = _momentum_factor(momentum, num_batches_tracked)
        if running_mean is not None:
            batch_mean = xi.mean(axis=2).mean(axis=0)
            new_rm = (1.0 - f) * running_mean + f * batch_mean
        if running_var is not None:
            batch_var = (xi.var(axis=2) * m / (m - 1)).mean(axis=0)
            new_rv = (1.0 - f) * running_var + f * batch_var
    return y, new_rm, new_rv


def instance_norm_backward(dy, x, running_mean=None, running_var=None,
                           weight=None, bias=None, use_input_stats=True,
                           eps=1e-5, axis=1):
    """Gradients of :func:`instance_norm`.

    Same formulas as :func:`batch_norm_backward`, the statistics groups being
    the (sample, channel) instances.  ``dweight``/``dbias`` are summed over
    every axis except the channel axis.

    Returns
    -------
    dx, dweight, dbias
    """
    x, dy = _f64(x), _f64(dy)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    weight, bias = _f64(weight), _f64(bias)
    ax = _channel_axis(axis, x.ndim)
    xi, moved_shape = _per_instance_3d(x, ax)
    dyi, _ = _per_instance_3d(dy, ax)

    mean, rstd, use_batch = _instance_norm_stats(xi, running_mean, running_var,
                                                 use_input_stats, eps)
    xhat = (xi - mean) * rstd
    g = dyi if weight is None else dyi * weight[None, :, None]
    if use_batch:
        dxi = _norm_input_grad(g, xhat, rstd, reduce_axes=2)
    else:
        dxi = g * rstd
    dweight, dbias = _param_grads(dyi, xhat, weight, bias, axes=(0, 2))
    return _from_per_instance_3d(dxi, moved_shape, ax), dweight, dbias


# ---------------------------------------------------------------------------
# layer normalization
# ---------------------------------------------------------------------------

def _layer_norm_rows(x, normalized_shape):
    normalized_shape = tuple(int(s) for s in np.atleast_1d(normalized_shape))
    k = len(normalized_shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k:] != normalized_shape:
        raise ValueError(
            f"normalized_shape {normalized_shape} does not match the trailing "
            f"dimensions of an input of shape {x.shape}")
    return (x.reshape(math.prod(x.shape[:x.ndim - k]), math.prod(normalized_shape)),
            normalized_shape)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization.

    Statistics over the trailing ``len(normalized_shape)`` dimensions::

        y = (x - mu) / sqrt(var + eps) * w + b

    with the biased variance; ``w`` and ``b`` have shape ``normalized_shape``.

    Returns
    -------
    y : ndarray
    """
    x = _f64(x)
    weight, bias = _f64(weight), _f64(bias)
    rows, normalized_shape = _layer_norm_rows(x, normalized_shape)
    mean = rows.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(rows.var(axis=1, keepdims=True) + eps)
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    y = _affine((rows - mean) * rstd, w, b)
    return y.reshape(x.shape)


def layer_norm_backward(dy, x, normalized_shape, weight=None, bias=None,
                        eps=1e-5):
    """Gradients of :func:`layer_norm`.

    Per row: ``g = dy * w``, ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``;
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over the leading
    (non-normalized) dimensions, with shape ``normalized_shape``.

    Returns
    -------
    dx, dweight, dbias
    """
    x, dy = _f64(x), _f64(dy)
    weight, bias = _f64(weight), _f64(bias)
    rows, normalized_shape = _layer_norm_rows(x, normalized_shape)
    dyr = dy.reshape(rows.shape)
    mean = rows.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(rows.var(axis=1, keepdims=True) + eps)
    xhat = (rows - mean) * rstd
    g = dyr if weight is None else dyr * weight.reshape(-1)
    dx = _norm_input_grad(g, xhat, rstd, reduce_axes=1)
    dweight, dbias = _param_grads(dyr, xhat, weight, bias, axes=0)
    if dweight is not None:
        dweight = dweight.reshape(normalized_shape)
    if dbias is not None:
        dbias = dbias.reshape(normalized_shape)
    return dx.reshape(x.shape), dweight, dbias


# ---------------------------------------------------------------------------
# group normalization
# ---------------------------------------------------------------------------

def _group_norm_groups(x, num_groups, axis):
    """Return ``(groups, moved_shape, ax)``: ``groups`` has shape
    ``(N, G, C // G, M)``."""
    ax = _channel_axis(axis, x.ndim)
    xi, moved_shape = _per_instance_3d(x, ax)
    n, c, m = xi.shape
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the {c} channels")
    return xi.reshape(n, num_groups, c // num_groups, m), moved_shape, ax


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1):
    """Group normalization.

    Per sample, the ``C`` channels are split into ``num_groups`` contiguous
    groups; statistics are taken over the channels of a group together with
    all non-batch, non-channel axes::

        y = (x - mu_ng) / sqrt(var_ng + eps) * w_c + b_c

    with the biased variance; ``w``/``b`` have shape ``(C,)``.

    Returns
    -------
    y : ndarray
    """
    x = _f64(x)
    weight, bias = _f64(weight), _f64(bias)
    xg, moved_shape, ax = _group_norm_groups(x, num_groups, axis)
    n, g, cg, m = xg.shape
    mean = xg.mean(axis=(2, 3), keepdims=True)
    rstd = 1.0 / np.sqrt(xg.var(axis=(2, 3), keepdims=True) + eps)
    xhat = ((xg - mean) * rstd).reshape(n, g * cg, m)
    w = None if weight is None else weight[None, :, None]
    b = None if bias is None else bias[None, :, None]
    y = _affine(xhat, w, b)
    return _from_per_instance_3d(y, moved_shape, ax)


def group_norm_backward(dy, x, num_groups, weight=None, bias=None, eps=1e-5,
                        axis=1):
    """Gradients of :func:`group_norm`.

    Per (sample, group): ``g = dy * w_c``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``;
    ``dweight_c = sum(dy * xhat)``, ``dbias_c = sum(dy)`` over every axis
    but the channel axis.

    Returns
    -------
    dx, dweight, dbias
    """
    x, dy = _f64(x), _f64(dy)
    weight, bias = _f64(weight), _f64(bias)
    xg, moved_shape, ax = _group_norm_groups(x, num_groups, axis)
    dyg, _, _ = _group_norm_groups(dy, num_groups, axis)
    n, g_count, cg, m = xg.shape
    mean = xg.mean(axis=(2, 3), keepdims=True)
    rstd = 1.0 / np.sqrt(xg.var(axis=(2, 3), keepdims=True) + eps)
    xhat = (xg - mean) * rstd
    g = dyg if weight is None else dyg * weight.reshape(1, g_count, cg, 1)
    dxg = _norm_input_grad(g, xhat, rstd, reduce_axes=(2, 3))
    dyi = dyg.reshape(n, g_count * cg, m)
    xhati = xhat.reshape(n, g_count * cg, m)
    dweight, dbias = _param_grads(dyi, xhati, weight, bias, axes=(0, 2))
    dx = _from_per_instance_3d(dxg.reshape(n, g_count * cg, m), moved_shape, ax)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# batch renormalization
# ---------------------------------------------------------------------------

def _batch_renorm_factors(xc, running_mean, running_std, eps, rmax, dmax):
    """Batch statistics and the correction factors ``r`` and ``d``."""
    mu = xc.mean(axis=0)
    sigma = np.sqrt(xc.var(axis=0) + eps)
    r = np.clip(sigma / running_std, 1.0 / rmax, rmax)
    d = np.clip((mu - running_mean) / running_std, -dmax, dmax)
    return mu, sigma, r, d


def batch_renorm(x, running_mean, running_std, weight=None, bias=None,
                 training=False, momentum=0.1, eps=1e-5, rmax=3.0, dmax=5.0,
                 axis=1):
    """Batch renormalization (Ioffe 2017, Algorithm 1).

    Training, per channel with batch mean ``mu_B`` and biased variance
    ``var_B``::

        sigma_B = sqrt(var_B + eps)
        r = clip(sigma_B / running_std, 1 / rmax, rmax)
        d = clip((mu_B - running_mean) / running_std, -dmax, dmax)
        y = w * ((x - mu_B) / sigma_B * r + d) + b
        running_mean += momentum * (mu_B - running_mean)
        running_std  += momentum * (sigma_B - running_std)

    (``r`` and ``d`` use the running values from before the update.)

    Inference::

        y = w * (x - running_mean) / running_std + b

    with no ``eps``; the running statistics are unchanged.

    Returns
    -------
    y, new_running_mean, new_running_std : ndarray
        The running statistics are returned as new arrays; the inputs are not
        modified.
    """
    x = _f64(x)
    running_mean, running_std = _f64(running_mean), _f64(running_std)
    weight, bias = _f64(weight), _f64(bias)
    ax = _channel_axis(axis, x.ndim)
    xc, moved_shape = _per_channel_2d(x, ax)

    if training:
        mu, sigma, r, d = _batch_renorm_factors(xc, running_mean, running_std,
                                                eps, rmax, dmax)
        z = (xc - mu) / sigma * r + d
        new_rm = running_mean + momentum * (mu - running_mean)
        new_rs = running_std + momentum * (sigma - running_std)
        if xc.shape[0] == 0:  # an empty batch changes nothing
            new_rm, new_rs = running_mean, running_std
    else:
        z = (xc - running_mean) / running_std
        new_rm, new_rs = running_mean, running_std
    y = _affine(z, weight, bias)
    return _from_per_channel_2d(y, moved_shape, ax), new_rm, new_rs


def batch_renorm_backward(dy, x, running_mean, running_std, weight=None,
                          bias=None, training=False, eps=1e-5, rmax=3.0,
                          dmax=5.0, axis=1):
    """Gradients of :func:`batch_renorm`, with ``r`` and ``d`` held constant.

    Training: with ``xhat = (x - mu_B) / sigma_B``, ``rstd = 1 / sigma_B`` and
    ``g = dy * w * r``::

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        dweight = sum(dy * (xhat * r + d)),  dbias = sum(dy)

    Inference: ``dx = dy * w / running_std``,
    ``dweight = sum(dy * (x - running_mean) / running_std)``.

    Returns
    -------
    dx, dweight, dbias
    """
    x, dy = _f64(x), _f64(dy)
    running_mean, running_std = _f64(running_mean), _f64(running_std)
    weight, bias = _f64(weight), _f64(bias)
    ax = _channel_axis(axis, x.ndim)
    xc, moved_shape = _per_channel_2d(x, ax)
    dyc, _ = _per_channel_2d(dy, ax)
    w = 1.0 if weight is None else weight

    if training:
        mu, sigma, r, d = _batch_renorm_factors(xc, running_mean, running_std,
                                                eps, rmax, dmax)
        rstd = 1.0 / sigma
        xhat = (xc - mu) * rstd
        dxc = _norm_input_grad(dyc * w * r, xhat, rstd, reduce_axes=0)
        z = xhat * r + d
    else:
        z = (xc - running_mean) / running_std
        dxc = dyc * w / running_std
    dweight, dbias = _param_grads(dyc, z, weight, bias, axes=0)
    return _from_per_channel_2d(dxc, moved_shape, ax), dweight, dbias


# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------

def _rms_rows(x, normalized_shape, eps):
    """``(rows, normalized_shape, rstd, eps)`` of RMSNorm; ``eps=None`` is
    the machine epsilon of ``x``'s own dtype."""
    eps = float(np.finfo(np.asarray(x).dtype).eps) if eps is None else eps
    rows, normalized_shape = _layer_norm_rows(_f64(x), normalized_shape)
    rstd = 1.0 / np.sqrt((rows * rows).mean(axis=1, keepdims=True) + eps)
    return rows, normalized_shape, rstd


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * w`` over the trailing
    ``normalized_shape`` dimensions (no mean subtraction, no bias).

    Returns
    -------
    y : ndarray
    """
    rows, _, rstd = _rms_rows(x, normalized_shape, eps)
    y = _affine(rows * rstd, None if weight is None else _f64(weight).reshape(-1),
                None)
    return y.reshape(np.shape(x))


def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None):
    """Gradients of :func:`rms_norm`.

    Per row of ``n`` values with ``xhat = x * rstd`` and ``g = dy * w``:
    ``d rstd / d x_i = -rstd**3 * x_i / n``, so
    ``dx = rstd * (g - xhat * mean(g * xhat))``; ``dweight = sum(dy * xhat)``
    over the leading dimensions.

    Returns
    -------
    dx, dweight
    """
    rows, normalized_shape, rstd = _rms_rows(x, normalized_shape, eps)
    dyr = _f64(dy).reshape(rows.shape)
    xhat = rows * rstd
    g = dyr if weight is None else dyr * _f64(weight).reshape(-1)
    dx = rstd * (g - xhat * (g * xhat).mean(axis=1, keepdims=True))
    dweight = None
    if weight is not None:
        dweight = (dyr * xhat).sum(axis=0).reshape(normalized_shape)
    return dx.reshape(np.shape(x)), dweight


# ---------------------------------------------------------------------------
# Ghost BatchNorm
# ---------------------------------------------------------------------------

def _ghost_batches(n, virtual_batch_size):
    if n % virtual_batch_size:
        raise ValueError(f"virtual_batch_size {virtual_batch_size} does not "
                         f"divide the batch size {n}")
    return [slice(i, i + virtual_batch_size)
            for i in range(0, n, virtual_batch_size)]


def ghost_batch_norm(x, virtual_batch_size, running_mean=None,
                     running_var=None, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5, axis=1, num_batches_tracked=None):
    """Ghost batch normalization.

    In training (or without running statistics) every block of
    ``virtual_batch_size`` consecutive samples is batch normalized with its
    own mean and biased variance.  The running statistics (given ones are
    not modified) get one update with the mean over ghost batches of their
    means and of their unbiased variances::

        new = (1 - f) * old + f * mean_over_ghost_batches(batch statistic)

    In inference with running statistics this is :func:`batch_norm`.

    Returns
    -------
    y, new_running_mean, new_running_var
    """
    if not training and running_mean is not None:
        return batch_norm(x, running_mean, running_var, weight, bias, False,
                          momentum, eps, axis)
    x = _f64(x)
    ax = _channel_axis(axis, x.ndim)
    ghosts = _ghost_batches(x.shape[0], virtual_batch_size)
    y = np.concatenate([np.empty((0,) + x.shape[1:])]
                       + [batch_norm(x[g], None, None, weight, bias, True,
                                     eps=eps, axis=ax)[0] for g in ghosts])
    new_rm, new_rv = _f64(running_mean), _f64(running_var)
    if training and running_mean is not None and x.size:
        columns = [_per_channel_2d(x[g], ax)[0] for g in ghosts]
        mean = np.mean([c.mean(axis=0) for c in columns], axis=0)
        var = np.mean([c.var(axis=0, ddof=1) for c in columns], axis=0)
        f = _momentum_factor(momentum, num_batches_tracked)
        new_rm = (1.0 - f) * new_rm + f * mean
        new_rv = (1.0 - f) * new_rv + f * var
    return y, new_rm, new_rv


def ghost_batch_norm_backward(dy, x, virtual_batch_size, running_mean=None,
                              running_var=None, weight=None, bias=None,
                              training=False, eps=1e-5, axis=1):
    """Gradients of :func:`ghost_batch_norm`: :func:`batch_norm_backward`
    of each ghost batch (``dx`` concatenated, ``dweight`` and ``dbias``
    summed), or of the whole batch in inference with running statistics.

    Returns
    -------
    dx, dweight, dbias
    """
    if not training and running_mean is not None:
        return batch_norm_backward(dy, x, running_mean, running_var, weight,
                                   bias, False, eps, axis)
    parts = [batch_norm_backward(dy[g], x[g], None, None, weight, bias, True,
                                 eps, axis)
             for g in _ghost_batches(np.shape(x)[0], virtual_batch_size)]
    dx = np.concatenate([np.empty((0,) + np.shape(x)[1:])] + [p[0] for p in parts])
    channels = np.shape(x)[_channel_axis(axis, np.ndim(x))]
    dweight = None if weight is None else sum((p[1] for p in parts), np.zeros(channels))
    dbias = None if bias is None else sum((p[2] for p in parts), np.zeros(channels))
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# Weight Normalization and Spectral Normalization
# ---------------------------------------------------------------------------

def _unit_norms(v, axis):
    """``||v||`` per index of ``axis`` (over all other axes), kept
    broadcastable against ``v``."""
    others = tuple(i for i in range(v.ndim) if i != axis % v.ndim)
    return np.sqrt((v * v).sum(axis=others, keepdims=True)), others


def weight_norm(v, g, axis=0):
    """Weight normalization ``w = g * v / ||v||``, the norm per index of
    ``axis`` over all other axes.

    Returns
    -------
    w : ndarray
    """
    v = _f64(v)
    norms, _ = _unit_norms(v, axis)
    return _f64(g).reshape(norms.shape) * v / norms


def weight_norm_backward(dw, v, g, axis=0):
    """Gradients of :func:`weight_norm`.

    With ``vhat = v / ||v||``: ``dg = sum(dw * vhat)`` and
    ``dv = g / ||v|| * (dw - vhat * sum(dw * vhat))`` per unit.

    Returns
    -------
    dv, dg
    """
    v, dw = _f64(v), _f64(dw)
    norms, others = _unit_norms(v, axis)
    vhat = v / norms
    s = (dw * vhat).sum(axis=others, keepdims=True)
    dv = _f64(g).reshape(norms.shape) / norms * (dw - vhat * s)
    return dv, s.reshape(-1)


def _weight_matrix(w, axis):
    w = _f64(w)
    moved = np.moveaxis(w, axis, 0)
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))


def spectral_norm(w, u, v, n_power_iterations=1, eps=1e-12, training=True,
                  axis=0):
    """Spectral normalization ``w / sigma`` with ``sigma = u^T W v``.

    ``W`` is ``w`` with ``axis`` moved first and the other axes flattened.
    In training, ``n_power_iterations`` steps of
    ``v = W^T u / max(||W^T u||, eps)``, ``u = W v / max(||W v||, eps)``
    come first (on copies).

    Returns
    -------
    y, new_u, new_v
    """
    matrix = _weight_matrix(w, axis)
    u, v = _f64(u), _f64(v)
    if training:
        for _ in range(n_power_iterations):
            v = matrix.T @ u
            v = v / max(np.linalg.norm(v), eps)
            u = matrix @ v
            u = u / max(np.linalg.norm(u), eps)
    sigma = u @ matrix @ v
    return _f64(w) / sigma, u, v


def spectral_norm_backward(dy, w, u, v, axis=0):
    """Gradient of ``w / sigma`` with ``sigma = u^T W v``, ``u`` and ``v``
    constants (those the forward used):
    ``dW = dY / sigma - sum(dY * W) / sigma**2 * u v^T``.

    Returns
    -------
    dw
    """
    matrix, dmatrix = _weight_matrix(w, axis), _weight_matrix(dy, axis)
    u, v = _f64(u), _f64(v)
    sigma = u @ matrix @ v
    dmatrix = dmatrix / sigma - (dmatrix * matrix).sum() / sigma**2 * np.outer(u, v)
    moved = np.moveaxis(_f64(w), axis, 0).shape
    return np.moveaxis(dmatrix.reshape(moved), 0, axis)
