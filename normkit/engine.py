"""The engine: the backend protocol's operations, dispatched on the input.

Each function here checks that its input is a float16/32/64 array (host or
device; TypeError otherwise) and hands its call to the backend of its input
(:func:`normkit.backend.backend_for`: :mod:`normkit.backend.cpu` for NumPy
arrays, :mod:`normkit.backend.cuda` for device arrays) and returns that
backend's arrays.  Schemes, built-in or plug-in, are written with these
functions and :class:`~normkit.backend.protocol.channelwise` arithmetic, so
they run on every backend without a line of backend code.  See
:class:`normkit.backend.protocol.Backend` for the contracts.

The passes that produce an array of the input's size (:func:`apply_affine`,
:func:`normalize_batch`, :func:`normalize_transformed`,
:func:`dx_from_sums`, :func:`backward`) take
``out=``: an array of ``x``'s shape and dtype on ``x``'s side (host or
device), written and returned instead of a new array; it may be ``x``
itself (or ``dy`` in a backward) for a pass in place, but not overlap
them partially (:func:`normkit.checks.check_out`).
"""

import math

import numpy as np

from .backend import backend_for, same_device
from .backend import protocol
from .checks import check_input, check_out
from .backend.cpu import as_kernel_array, from_kernel_array  # noqa: F401
from .backend.plan import Plan, make_plan  # noqa: F401
from .view import View, channel_view, trailing_view  # noqa: F401

__all__ = ["moment_partials", "merge_partials", "moments", "normalize_batch",
           "normalize_transformed", "apply_affine", "backward_sums",
           "dx_from_sums", "backward",
           "View", "channel_view", "trailing_view", "make_plan", "Plan"]


def moment_partials(x, view):
    """Mergeable per-group partials ``(P, chunks, K, 3)`` of ``(n, mean,
    M2)``; see :meth:`~normkit.backend.protocol.Backend.moment_partials`.

    Examples
    --------
    >>> import numpy as np
    >>> from normkit import engine
    >>> x = np.arange(6.0).reshape(2, 3)
    >>> part = engine.moment_partials(x, engine.trailing_view(x.shape, 1))
    >>> part[:, :, 0].tolist()            # n, mean, M2 of each row
    [[[3.0, 1.0, 2.0]], [[3.0, 4.0, 2.0]]]
    """
    check_input(x, "x", "engine.moment_partials")
    return backend_for(x).moment_partials(x, view)


def merge_partials(partials, centered=True):
    """Mean and biased variance ``(P, K)`` from partials (Chan's merge, in
    chunk order); see :meth:`~normkit.backend.protocol.Backend.merge_partials`."""
    return backend_for(partials).merge_partials(partials, centered)


def moments(x, view, centered=True):
    """Per-group mean and biased variance, both ``(P, K)`` float64.

    ``var = 1/n * sum (x - mean)**2`` over each group of ``n`` values.
    With ``centered=False`` the statistics are taken about zero instead:
    the mean returned is 0 and the "variance" is the mean square
    ``1/n * sum x**2``, computed as ``var + mean**2`` from the stable
    moments (a sum of two non-negative terms: no cancellation); for a
    group with an infinite value, where those moments give NaN, it is
    summed again plainly: +inf, or NaN where the group holds a NaN.

    Where each group is one contiguous run of values (``view.A == 1``:
    rows, channels-first instances and groups), the CPU backend returns
    the same bits as the statistics :func:`normalize_batch` normalizes
    with.

    Examples
    --------
    >>> import numpy as np
    >>> from normkit import engine
    >>> x = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    >>> mean, var = engine.moments(x, engine.trailing_view(x.shape, 1))
    >>> mean.ravel().tolist(), var.ravel().round(4).tolist()
    ([2.0, 2.0], [0.6667, 0.0])
    """
    check_input(x, "x", "engine.moments")
    return backend_for(x).moments(x, view, centered)


def apply_affine(x, view, mean, alpha, gamma=None, beta=None, *, out=None):
    """``y = (x - mean) * alpha * gamma + beta``, returned in ``x.dtype``.

    ``mean`` and ``alpha`` are per group (``P * K`` values, or ``K``
    shared by every ``p``); ``gamma`` and ``beta`` per ``(K, J)`` (or None
    for 1 and 0).  ``out``: write ``y`` there (``x`` itself for a pass in
    place) and return it.
    """
    check_input(x, "x", "engine.apply_affine")
    check_out(out, x, "engine.apply_affine")
    return backend_for(x).apply_affine(x, view, mean, alpha, gamma, beta, out)


def normalize_batch(x, view, gamma=None, beta=None, eps=1e-5, centered=True, *,
                    out=None):
    """Normalize with the statistics of ``x`` itself.

    ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` per group, with the
    biased variance.  Groups that fit in one work item are reduced and
    normalized in one pass over memory.  ``centered=False`` normalizes by
    the root mean square instead, ``y = x / sqrt(mean(x**2) + eps) * gamma
    + beta`` (see :func:`moments`; the returned mean is 0 and var the mean
    square).  ``out``: write ``y`` there (``x`` itself for a pass in
    place: the statistics are complete before ``y`` is written) and
    return it.

    Returns
    -------
    y : array, same shape and dtype as ``x``
    mean, var : array, ``(P, K)`` float64
    rstd : array, ``(P, K)`` float64
        ``1 / sqrt(var + eps)``, the factor ``y`` was normalized with.
    """
    check_input(x, "x", "engine.normalize_batch")
    check_out(out, x, "engine.normalize_batch")
    return backend_for(x).normalize_batch(x, view, gamma, beta, eps, centered,
                                          out)


def normalize_transformed(x, view, transform, args=(), gamma=None, beta=None,
                          centered=True, *, out=None):
    """Normalize with coefficients that ``transform`` derives per group
    from the statistics of ``x`` itself:

    .. math::

        (c, \\alpha, \\ldots) = \\mathrm{transform}(\\mu, \\sigma^2,
        \\mathrm{args}), \\qquad y = (x - c) \\, \\alpha \\, \\gamma + \\beta

    per group, with the mean and biased variance of :func:`moments`
    (``centered=False``: 0 and the mean square).  Where
    :func:`normalize_batch` fuses its statistics and its map into one pass
    over memory, so does this: the transform runs inside that pass, per
    group, between the two.  ``normalize_batch`` is the transform
    ``(mean, 1 / sqrt(var + eps))``; Batch Renormalization's corrections
    toward the running statistics are another.

    Parameters
    ----------
    x : array
    view : View
    transform : channelwise
        A :class:`~normkit.backend.protocol.channelwise` function of
        ``(mean, var, *args)`` with two outputs or more, the first two the
        center ``c`` and the factor ``alpha``; any others are returned.
    args : tuple
        Its other arguments, each a number or an array of ``P * K``
        values, one per group in ``(p, k)`` order (per channel where ``P
        == 1``), on ``x``'s side.
    gamma, beta : array, optional
        Per ``(k, j)``, as in :func:`apply_affine` (None: 1 and 0).
    centered : bool
    out : array, optional
        Write ``y`` there (``x`` itself for a pass in place) and return it.

    Returns
    -------
    y : array, same shape and dtype as ``x``
    mean, var : array, ``(P, K)`` float64
    results : tuple of arrays, each ``(P, K)`` float64
        Every output of ``transform`` as the pass used it: ``c``,
        ``alpha``, then the others.

    Examples
    --------
    >>> import numpy as np
    >>> from normkit import channelwise, engine
    >>> @channelwise(outputs=2)
    ... def floored(mean, var, floor):     # a variance floor
    ...     return mean, 1.0 / max(var, floor) ** 0.5
    >>> x = np.array([[1.0, 3.0], [5.0, 5.0]])
    >>> y, mean, var, (c, alpha) = engine.normalize_transformed(
    ...     x, engine.trailing_view(x.shape, 1), floored, (0.25,))
    >>> y.tolist(), alpha.ravel().tolist()
    ([[-1.0, 1.0], [0.0, 0.0]], [1.0, 2.0])
    """
    func = "engine.normalize_transformed"
    check_input(x, "x", func)
    check_out(out, x, func)
    _check_transform(transform, args, view, x, func)
    return backend_for(x).normalize_transformed(x, view, transform, tuple(args),
                                                gamma, beta, centered, out)


def _check_transform(transform, args, view, x, func):
    """The transform of :func:`normalize_transformed` and its arguments,
    checked before anything runs."""
    if not isinstance(transform, protocol.channelwise) or (
            transform.function is None):
        raise TypeError(f"{func}: transform must be a channelwise function, "
                        f"got {transform!r}")
    if transform.outputs < 2:
        raise ValueError(f"{func}: transform must return at least two values "
                         f"(center, factor), {transform.__name__} returns "
                         f"{transform.outputs}")
    if len(args) != transform.arity - 2:
        raise TypeError(f"{func}: {transform.__name__} takes mean, var and "
                        f"{transform.arity - 2} more arguments, got "
                        f"{len(args)} in args")
    groups = view.P * view.K
    arrays = {}
    for n, a in enumerate(args):
        if protocol.is_number(a):
            continue
        name = f"args[{n}]"
        check_input(a, name, func)
        if math.prod(a.shape) != groups:
            raise ValueError(f"{func}: {name} must be a number or hold one "
                             f"value per group, P * K = {groups}, got shape "
                             f"{tuple(a.shape)}")
        arrays[name] = a
    if arrays and not all(type(a) is np.ndarray for a in (x, *arrays.values())):
        same_device(func, {"x": x, **arrays})


def backward_sums(dy, x, view, mean, rstd, gscale=None, centered=True):
    """Backward reductions: ``(group, affine)``.

    ``group = (sum g*dy, sum g*dy*xhat)`` per group ``(p, k)`` (two
    ``(P, K)`` arrays, ``g = gscale`` per ``(k, j)``, 1 when None) and
    ``affine = (sum dy, sum dy*xhat)`` per ``(k, j)`` (two ``(K*J,)``
    arrays), with ``xhat = (x - mean) * rstd`` (``x * rstd`` when not
    ``centered``).
    """
    check_input(x, "x", "engine.backward_sums")
    group, affine = backend_for(x).backward_sums(dy, x, view, mean, rstd,
                                                 gscale, centered)
    return tuple(group), tuple(affine)


def dx_from_sums(dy, x, view, mean, rstd, gscale, group_sums, n, centered=True,
                 *, out=None):
    """``dx`` from group sums of :func:`backward_sums`, possibly combined
    with other groups' (another process's) first:

    .. math::

        dx = \\mathrm{rstd} \\, (g\\,dy - S_0 / n - \\hat{x} \\, S_1 / n)

    with ``(S_0, S_1) = group_sums`` per group (``S_0`` ignored when not
    ``centered``); ``n = inf`` for fixed statistics gives ``g * dy * rstd``.
    ``out``: write ``dx`` there (``dy`` or ``x`` themselves for a pass in
    place) and return it.
    """
    check_input(x, "x", "engine.dx_from_sums")
    _check_dx_out(out, dy, x, "engine.dx_from_sums")
    return backend_for(x).dx_from_sums(dy, x, view, mean, rstd, gscale,
                                       group_sums, n, centered, out)


def _check_dx_out(out, dy, x, func):
    """``out`` of a backward: checked against ``x`` and ``dy``."""
    if out is not None:
        check_out(out, x, func)
        check_out(out, dy, func, like_name="dy")


def backward(dy, x, view, mean, rstd, gscale=None, batch_stats=True,
             need_affine=True, centered=True, *, out=None, affine_out=None):
    """Gradients of ``y = xhat * g + beta`` with ``xhat = (x - mean) * rstd``.

    Parameters
    ----------
    dy, x : array
        Upstream gradient and the forward input, same shape.
    view : View
    mean, rstd : array, ``(P, K)``
        The statistics the forward pass used.
    gscale : array, ``(K * J,)``, optional
        Multiplier ``g`` of ``xhat`` in the output (the weight; Batch
        Renormalization passes ``weight * r``).  None means 1.
    batch_stats : bool
        True when ``mean`` and ``rstd`` were computed from ``x`` (training):
        ``dx = rstd * (g*dy - mean(g*dy) - xhat * mean(g*dy*xhat))`` per
        group.  False for fixed statistics: ``dx = g * dy * rstd``.
    need_affine : bool
        Also return the per-(k, j) sums ``sum dy`` and ``sum dy * xhat``.
    centered : bool
        False for statistics taken about zero (:func:`moments`): ``mean``
        is ignored (``xhat = x * rstd``) and, with ``batch_stats``, the
        mean term drops out, ``dx = rstd * (g*dy - xhat * mean(g*dy*xhat))``.
    out : array, optional
        Write ``dx`` there and return it: ``x``'s shape and dtype, on its
        side; ``dy`` or ``x`` themselves for a pass in place (the sums are
        complete before ``dx`` is written).
    affine_out : pair of arrays, optional
        With ``need_affine``: where to write ``sum_dy`` and
        ``sum_dy_xhat`` (each ``K * J`` values, any shape, float16, bfloat16,
        float32 or float64, writeable, on ``x``'s side), e.g. the
        parameters' gradients in their own dtype.  The sums are still
        accumulated in float64 and rounded once; over few wide rows the
        kernels write them there directly, without a float64 array of
        the rows' width.

    Returns
    -------
    dx : array, shape and dtype of ``x``
    sum_dy, sum_dy_xhat : array ``(K * J,)`` float64 (``affine_out``'s
        arrays when given), or None
    """
    check_input(x, "x", "engine.backward")
    _check_dx_out(out, dy, x, "engine.backward")
    if affine_out is not None:
        affine_out = _checked_affine_out(affine_out, x, view, need_affine)
    dx, sum_dy, sum_dy_xhat = backend_for(x).backward(
        dy, x, view, mean, rstd, gscale, batch_stats, need_affine, centered,
        out, affine_out)
    if affine_out is None or sum_dy is affine_out[0]:  # none, or written
        return dx, sum_dy, sum_dy_xhat
    return (dx, protocol.copy(sum_dy, out=affine_out[0]),
            protocol.copy(sum_dy_xhat, out=affine_out[1]))


def _checked_affine_out(affine_out, x, view, need_affine):
    """``affine_out`` of :func:`backward` as a tuple, checked: two
    writeable float arrays of ``K * J`` values on ``x``'s side."""
    func = "engine.backward"
    if not need_affine:
        raise ValueError(f"{func}: affine_out is given but need_affine is "
                         f"False")
    if not isinstance(affine_out, (tuple, list)) or len(affine_out) != 2:
        raise TypeError(f"{func}: affine_out must be a pair of arrays "
                        f"(sum dy, sum dy*xhat), got {affine_out!r}")
    names = ("affine_out[0]", "affine_out[1]")
    if not all(type(a) is np.ndarray for a in (x, *affine_out)):
        affine_out = tuple(same_device(func, {"x": x, **dict(
            zip(names, affine_out))}).values())[1:]
    size = view.K * view.J
    for name, a in zip(names, affine_out):
        check_input(a, name, func)
        if math.prod(a.shape) != size:
            raise ValueError(f"{func}: {name} must hold K * J = {size} "
                             f"values, got shape {a.shape}")
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"{func}: {name} is written and must be "
                             f"writeable")
    return tuple(affine_out)
