"""The extension API: what every scheme, built-in or plug-in, is made of.

A scheme is a :class:`Normalizer` subclass: the :class:`~normkit.view.View`
its input maps onto, plus what it does with the statistics.  The base class
owns everything else: checking ``x`` and ``dy`` once, parameters and
state, device placement, ``train()`` / ``eval()``, ``state_dict()``.
A scheme is written with

- :func:`normalize` (statistics of the input, one fused pass) and
  :func:`normalize_with_statistics` (given statistics), which return the
  :class:`Saved` record the backward needs, and :func:`normalize_backward`;
- :mod:`normkit.engine` (moments, partials, backward sums, dx from sums)
  and :class:`~normkit.backend.protocol.channelwise` arithmetic for
  per-channel steps, which run on every backend;
- :class:`RunningStatsNormalizer` and :func:`update_running` for running
  statistics with PyTorch's semantics.

Every built-in (:mod:`normkit.schemes.batch`,
:mod:`normkit.schemes.per_sample`, :mod:`normkit.schemes.reparam`) is
written with exactly these names.
"""

from dataclasses import dataclass, field, replace
import functools
import inspect
import math

import numpy as np

from .. import backend, engine
from ..backend.protocol import channelwise, copy, inverse_std
from ..checks import (check_eps, check_input, check_momentum, check_out,
                      check_positive_int, overlap)
from ..view import View

__all__ = ["Saved", "Normalizer", "RunningStatsNormalizer", "normalize",
           "normalize_with_statistics", "normalize_backward",
           "affine_gradients", "check_backward", "cast", "update_running",
           "momentum_factor", "forward_into", "backward_into",
           "DIRECT_GRADIENTS"]


@dataclass(frozen=True)
class Saved:
    """What a forward pass hands its backward pass.

    A frozen record: schemes make one with :func:`normalize` or
    :func:`normalize_with_statistics` and add their own arrays with
    ``saved.replace(extras={...})``.

    Parameters
    ----------
    variant, view, shape, mean, rstd, batch_stats, weight, has_bias
        As the attributes below.
    r, d, centered, var, extras, gradients, bias_shape : optional
        As the attributes below (defaults None, None, True, None, {},
        None, None; ``extras=None`` is an empty dict).

    Attributes
    ----------
    variant : str
        Name of the forward that produced it.
    view : View
        The canonical view of the input.
    shape : tuple of int
        Shape of the input.
    mean, rstd : array, ``(P, K)`` float64
        Statistics used to normalize: ``xhat = (x - mean) * rstd``.
    batch_stats : bool
        True when ``mean`` and ``rstd`` came from the input itself, so the
        gradient flows through them.
    weight : array or None
        The weight used (a reference, not a copy).
    has_bias : bool
        Whether a bias was used (its gradient is returned then).
    r, d : array ``(K * J,)`` or None
        Batch Renormalization's corrections, constants of the backward.
    centered : bool
        False when the statistics were taken about zero (RMS
        normalization): ``mean`` is 0 and ``xhat = x * rstd``.
    var : array ``(P, K)`` or None
        The biased variance of each group (the mean square when not
        ``centered``) when the statistics came from the input.
    extras : dict
        Anything else a scheme's backward needs (its own arrays, by name).
    gradients : callable or None
        ``gradients(dy, x, saved) -> (dx, dweight, dbias)`` for a scheme
        whose gradient is not :func:`normalize_backward`'s generic one;
        :func:`normalize_backward` calls it after its checks.
    bias_shape : tuple of int or None
        Shape of the bias used, for its gradient (None: the weight's
        shape, or flat).

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).standard_normal((4, 6))
    >>> y, saved = normkit.layer_norm(x, 6, return_saved=True)
    >>> saved.variant, saved.view, saved.mean.shape, saved.batch_stats
    ('layer_norm', View(P=4, A=1, K=1, J=6, B=1), (4, 1), True)
    """

    variant: str
    view: View
    shape: tuple
    mean: np.ndarray
    rstd: np.ndarray
    batch_stats: bool
    weight: np.ndarray | None
    has_bias: bool
    r: np.ndarray | None = None
    d: np.ndarray | None = None
    centered: bool = True
    var: np.ndarray | None = None
    extras: dict = field(default_factory=dict)
    gradients: object = None
    bias_shape: tuple | None = None

    def __init__(self, variant, view, shape, mean, rstd, batch_stats, weight,
                 has_bias, r=None, d=None, centered=True, var=None,
                 extras=None, gradients=None, bias_shape=None):
        # Every forward makes a record: fill its __dict__ in one step, where
        # the frozen dataclass's own __init__ calls object.__setattr__ once
        # per field (1.2 of its 2 microseconds).  The fields above and this
        # signature agree (tests/test_protocol.py checks it).
        fields = locals()
        del fields["self"]
        if extras is None:
            fields["extras"] = {}
        self.__dict__.update(fields)

    def replace(self, **changes):
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)


def normalize(x, view, weight=None, bias=None, eps=1e-5, *, return_saved=False,
              variant="normalize", centered=True, out=None):
    """Normalize ``x`` over a :class:`~normkit.view.View` with its own
    statistics.

    .. math::

        y = \\frac{x - \\mu_{pk}}{\\sqrt{\\sigma^2_{pk} + \\epsilon}}
            \\gamma_{kj} + \\beta_{kj}

    with the mean and biased variance of each ``(p, k)`` group of the view,
    and ``weight`` and ``bias`` of ``K * J`` values (any shape of that
    size).  This is the building block of every scheme.

    Parameters
    ----------
    x : array
        float16, float32 or float64 input of ``view.P * ... * view.B``
        values (NumPy or CUDA device array).
    view : View
    weight, bias : array, optional
        ``gamma`` and ``beta``; default 1 and 0.
    eps : float, default 1e-5
    return_saved : bool, default False
        Also return the :class:`Saved` record for :func:`normalize_backward`.
    variant : str, default "normalize"
        Name recorded in the :class:`Saved` record.
    centered : bool, default True
        False normalizes by the root mean square about zero instead,
        ``y = x / sqrt(mean(x**2) + eps) * weight + bias`` (RMSNorm).
    out : array, optional
        Write ``y`` there and return it: ``x``'s shape and dtype, on its
        side (host or device), any layout.  ``x`` itself normalizes in
        place (the statistics are complete before ``y`` is written), but
        then the backward, which recomputes ``xhat`` from ``x``, cannot
        run.

    Returns
    -------
    y : array, shape and dtype of ``x``, or ``(y, saved)``

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (4, 6))
    >>> y, saved = normkit.normalize(x, normkit.View(4, 1, 1, 6, 1),
    ...                              return_saved=True)
    >>> bool(np.allclose(y.mean(axis=1), 0.0)), saved.mean.shape
    (True, (4, 1))
    """
    check_input(x, "x", variant)
    if isinstance(x, np.ndarray) and math.prod(view.dims) != x.size:
        raise ValueError(f"{variant}: view {view} covers "
                         f"{math.prod(view.dims)} values but x has {x.size}")
    y, mean, var, rstd = engine.normalize_batch(x, view, weight, bias, eps,
                                                centered, out=out)
    if not return_saved:
        return y
    # rstd flat, as these records have always held it: normkit.torch's
    # operators return it as is, and torch.compile's on-disk cache keys
    # compiled graphs on their inputs, not on what the operators return.
    saved = Saved(variant, view, x.shape, mean, rstd.reshape(-1), True,
                  weight, bias is not None, centered=centered, var=var,
                  bias_shape=_shape_of(bias))
    return y, saved


def normalize_with_statistics(x, view, mean, rstd, weight=None, bias=None, *,
                              variant="normalize", out=None):
    """``y = (x - mean) * rstd * weight + bias`` with given statistics.

    ``mean`` and ``rstd`` hold one value per group (``P * K``) or per
    ``k`` shared by every ``p``; the gradient does not flow through them
    (``saved.batch_stats`` is False).  This is inference with running
    statistics.

    Parameters
    ----------
    x : array
        float16, float32 or float64 input of the view's size.
    view : View
    mean, rstd : array
        Per group ``(P, K)``, or per ``k`` (``K`` values) for every ``p``.
    weight, bias : array of ``K * J`` values, optional
    variant : str, default "normalize"
        Name recorded in the :class:`Saved` record.
    out : array, optional
        Write ``y`` there and return it (``x``'s shape and dtype, on its
        side); ``x`` itself for inference in place (an elementwise map).

    Returns
    -------
    (y, saved)

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.ones((2, 3))
    >>> y, _ = normkit.normalize_with_statistics(
    ...     x, normkit.View(1, 2, 3, 1, 1), np.zeros(3), np.full(3, 2.0))
    >>> y.tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    rows = 1 if _size(mean) == view.K else view.P
    if not backend.is_device_array(mean):
        mean = np.asarray(mean, np.float64)
        rstd = np.asarray(rstd, np.float64)
    mean = mean.reshape(rows, view.K)
    rstd = rstd.reshape(rows, view.K)
    y = engine.apply_affine(x, view, mean, rstd, weight, bias, out=out)
    return y, Saved(variant, view, x.shape, mean, rstd, False, weight,
                    bias is not None, bias_shape=_shape_of(bias))


def _shape_of(a):
    return None if a is None else tuple(a.shape)


def _size(a):
    return math.prod(a.shape)


def check_backward(func, dy, x, saved, saved_type=Saved, dx_out=None):
    """Check the arguments of a backward: ``saved`` is a ``saved_type``
    record, ``x`` and ``dy`` are float arrays of the forward input's shape
    (and ``dx_out``, if given, an array of ``x``'s shape and dtype on the
    same side, see :func:`normkit.checks.check_out`).  Returns ``dy`` and
    ``x`` as Numba device arrays where they are device arrays (with
    ``dx_out``: ``(dy, x, dx_out)``)."""
    if not isinstance(saved, saved_type):
        raise TypeError(f"{func}: saved must be the {saved_type.__name__} "
                        f"record returned by the forward with "
                        f"return_saved=True, got {type(saved).__name__}")
    arrays = {"x": x, "dy": dy}
    if getattr(saved, "mean", None) is not None:
        arrays["saved.mean"] = saved.mean
    if dx_out is not None:
        arrays["dx_out"] = dx_out
    arrays = backend.same_device(func, arrays)
    for name in ("x", "dy"):
        check_input(arrays[name], name, func)
        if arrays[name].shape != tuple(saved.shape):
            raise ValueError(f"{func}: {name} must have the forward input's "
                             f"shape {tuple(saved.shape)}, got "
                             f"{arrays[name].shape}")
    if dx_out is None:
        return arrays["dy"], arrays["x"]
    dx_out = check_out(arrays["dx_out"], arrays["x"], func, "dx_out")
    check_out(dx_out, arrays["dy"], func, "dx_out", "dy")
    return arrays["dy"], arrays["x"], dx_out


@functools.lru_cache(maxsize=None)
def takes(function, name):
    """True when ``function`` accepts the keyword argument ``name`` (the
    base class asks a scheme's ``_forward`` for ``out`` and its
    ``_backward`` or gradient function for ``dx_out``)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def written(out, y):
    """``out`` holding ``y``: returned as it is when ``y`` is ``out`` (or
    a view of its memory in the same layout), else ``y`` is copied into
    it (one copy, on ``out``'s backend)."""
    if y is out or overlap(y, out) == "same":
        return out
    return backend.backend_for(out).copy_into(out, y)


def forward_into(scheme, x, out=None):
    """``(y, saved)`` of ``scheme._forward(x)`` with ``y`` written into
    ``out`` (checked by the caller) when given.

    A scheme whose ``_forward`` accepts ``out`` (every built-in, and a
    plug-in that only overrides :meth:`Normalizer.view`) writes there
    directly; for any other, its result is copied into ``out`` (correct,
    at the cost of one copy).  A ``_forward`` that accepts ``out`` must
    allow ``out`` to be ``x`` itself: read ``x`` fully (statistics)
    before the pass that writes ``out``, as :func:`normalize` does.
    """
    if out is None:
        return scheme._forward(x)
    if takes(type(scheme)._forward, "out"):
        y, saved = scheme._forward(x, out=out)
    else:
        y, saved = scheme._forward(x)
    return written(out, y), saved


def backward_into(scheme, dy, x, saved, dx_out=None):
    """``(dx, grads)`` of ``scheme._backward(dy, x, saved)`` with ``dx``
    written into ``dx_out`` (checked by the caller) when given: directly
    when the scheme's ``_backward`` accepts ``dx_out``, else by one copy
    (see :func:`forward_into`)."""
    if dx_out is None:
        return scheme._backward(dy, x, saved)
    if takes(type(scheme)._backward, "dx_out"):
        dx, grads = scheme._backward(dy, x, saved, dx_out=dx_out)
    else:
        dx, grads = scheme._backward(dy, x, saved)
    return written(dx_out, dx), grads


def normalize_backward(dy, x, saved, variant=None, *, dx_out=None):
    """Backward of any forward pass: ``(dx, dweight, dbias)``.

    With ``g = weight * dy`` and ``n`` values per group, when the
    statistics came from the batch

    .. math::

        dx = \\mathrm{rstd} \\, (g - \\overline{g} - \\hat{x} \\,
             \\overline{g \\hat{x}})

    (without the ``mean(g)`` term when the statistics were taken about
    zero, ``saved.centered`` false) and ``dx = g * rstd`` for fixed
    statistics; ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over
    everything but the parameters' axes.  A record whose scheme has its
    own gradient (``saved.gradients``, e.g. Batch Renormalization) is
    handed to it after the checks.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).standard_normal((4, 6))
    >>> y, saved = normkit.normalize(x, normkit.View(4, 1, 1, 6, 1),
    ...                              return_saved=True)
    >>> dx, dweight, dbias = normkit.normalize_backward(np.ones_like(y), x, saved)
    >>> bool(np.allclose(dx, 0.0)), dweight       # sum(y) is constant
    (True, None)

    Parameters
    ----------
    dy, x : array
        The upstream gradient and the forward's unmodified input.
    saved : Saved
        The record of the forward (``return_saved=True``).
    variant : str, optional
        Expected ``saved.variant``; a record of another forward raises.
    dx_out : array, optional
        Write ``dx`` there and return it: ``x``'s shape and dtype, on its
        side, any layout; ``dy`` (or ``x``) itself for a backward in place
        (the sums are complete before ``dx`` is written).  A scheme's own
        gradient function (``saved.gradients``) receives it when it
        accepts ``dx_out``; otherwise its ``dx`` is copied there.

    Returns
    -------
    dx : array, shape and dtype of ``x``
    dweight, dbias : array or None
        Shaped and typed like the weight (None without weight or bias).
    """
    func = f"{variant or getattr(saved, 'variant', 'normalize')}_backward"
    if dx_out is None:
        dy, x = check_backward(func, dy, x, saved)
    else:
        dy, x, dx_out = check_backward(func, dy, x, saved, dx_out=dx_out)
    if variant is not None and saved.variant != variant:
        raise ValueError(f"{func}: saved comes from {saved.variant}, not "
                         f"{variant}")
    if saved.gradients is None:
        return affine_gradients(dy, x, saved, dx_out=dx_out)
    if dx_out is None:
        return saved.gradients(dy, x, saved)
    if takes(saved.gradients, "dx_out"):
        return saved.gradients(dy, x, saved, dx_out=dx_out)
    dx, *grads = saved.gradients(dy, x, saved)
    return (written(dx_out, dx), *grads)


#: Fewest parameter values (``K * J``) for which :func:`affine_gradients`
#: has the backend write the gradients in the parameters' dtype
#: (``affine_out`` of :func:`normkit.engine.backward`; over few wide rows
#: the kernels then make no float64 array of the rows' width).  Below it
#: the float64 sums are small, and casting them costs less than checking
#: the arrays to write into (a few microseconds a backward).
DIRECT_GRADIENTS = 1 << 15


def affine_gradients(dy, x, saved, gscale=None, weight_sum=None, *,
                     dx_out=None):
    """The gradients of ``y = xhat * g + beta`` for checked arguments:
    ``(dx, dweight, dbias)`` with ``g = gscale`` (default the weight);
    ``dx`` is written into ``dx_out`` when given (see
    :func:`normalize_backward`).

    ``dweight`` is ``sum(dy * xhat)`` per ``(k, j)``, or
    ``weight_sum(sum_dy, sum_dy_xhat)`` for a scheme whose output is not
    affine in ``xhat`` alone; ``dweight`` and ``dbias`` are cast to the
    weight's shape and dtype.
    """
    weight = saved.weight
    if gscale is None and weight is not None:
        gscale = weight.reshape(weight.size)
    need_affine = weight is not None or saved.has_bias
    size = saved.view.K * saved.view.J
    bias_shape = (saved.bias_shape or
                  (weight.shape if weight is not None else (size,)))
    dtype = weight.dtype if weight is not None else x.dtype
    gradients = None
    if need_affine and weight_sum is None and size >= DIRECT_GRADIENTS:
        # written by the backend in the parameters' dtype (a missing one's
        # sum into scratch of the same dtype)
        new = backend.backend_for(x).empty
        gradients = (new(bias_shape if saved.has_bias else (size,), dtype),
                     new(weight.shape if weight is not None else (size,),
                         dtype))
    dx, sum_dy, sum_dy_xhat = engine.backward(
        dy, x, saved.view, saved.mean, saved.rstd, gscale, saved.batch_stats,
        need_affine, saved.centered, out=dx_out, affine_out=gradients)
    if need_affine and gradients is None:  # from the float64 sums
        if weight is not None:
            if weight_sum is not None:
                sum_dy_xhat = weight_sum(sum_dy, sum_dy_xhat)
            sum_dy_xhat = cast(sum_dy_xhat, weight.shape, dtype)
        if saved.has_bias:
            sum_dy = cast(sum_dy, bias_shape, dtype)
    dweight = sum_dy_xhat if weight is not None else None
    dbias = sum_dy if saved.has_bias else None
    return dx, dweight, dbias


def cast(a, shape, dtype):
    """``a`` as a new array of ``shape`` and ``dtype`` on its backend."""
    if not backend.is_device_array(a):
        return np.asarray(a).reshape(shape).astype(dtype)
    return copy(a, out=backend.backend_for(a).empty(shape, dtype))


# --------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------

def momentum_factor(momentum, num_batches_tracked):
    """Weight of the new batch in a running update: ``momentum``, or for
    ``momentum=None`` the cumulative average's ``1 / (num_batches_tracked
    + 1)``."""
    if momentum is None:
        return 1.0 / (int(num_batches_tracked) + 1)
    return float(momentum)


@channelwise
def _moving_average(running, value, factor, scale):
    return (1.0 - factor) * running + factor * (scale * value)


@channelwise(outputs=2)
def _moving_averages(running_mean, mean, running_spread, spread, factor,
                     scale):
    """:func:`_moving_average` of the mean (unscaled) and of the spread
    (scaled) in one call: one compiled loop instead of two calls."""
    return ((1.0 - factor) * running_mean + factor * mean,
            (1.0 - factor) * running_spread + factor * (scale * spread))


def _batch_row(rows):
    """The batch's values of ``(P, C)`` rows: the row for ``P == 1``, else
    the mean over ``p``."""
    if rows.shape[0] > 1:
        return engine.moments(rows, View(1, rows.shape[0], rows.shape[1],
                                         1, 1))[0]
    return rows


def _has_rows(rows):
    """False for ``(0, C)`` rows (a batch without groups), True otherwise
    (None included: that statistic is not updated)."""
    return rows is None or rows.shape[0] != 0


def _unbiased_scale(n):
    """``n / (n - 1)`` (1 for None, inf for ``n = 1``)."""
    return 1.0 if n is None else n / (n - 1) if n != 1 else math.inf


def update_running(running, rows, factor, n=None):
    """``running <- (1 - factor) * running + factor * s * mean_p(rows)`` in
    place.

    ``rows`` is ``(P, C)`` (one row per statistics group along ``p``, e.g.
    per sample for InstanceNorm; averaged over ``p``), ``s = n / (n - 1)``
    is the unbiased correction for variances of ``n`` values (1 when ``n``
    is None; inf for ``n = 1``); no rows leave ``running`` alone.  Host or
    device arrays alike.

    Parameters
    ----------
    running : array ``(C,)``
        Updated in place.
    rows : array ``(P, C)``
        The batch's statistics, one row per group along ``p``.
    factor : float
        Weight of the batch (:func:`momentum_factor`).
    n : int, optional
        Values per group, for the unbiased factor ``n / (n - 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from normkit.schemes import update_running
    >>> running = np.zeros(2)
    >>> update_running(running, np.array([[1.0, 2.0], [3.0, 4.0]]), 0.5)
    >>> running.tolist()
    [1.0, 1.5]
    """
    if rows.shape[0] == 0:  # no rows: nothing to fold in
        return
    _moving_average(running, _batch_row(rows), factor, _unbiased_scale(n),
                    out=running)


# --------------------------------------------------------------------------
# the base classes
# --------------------------------------------------------------------------

class Normalizer:
    """Base class of every scheme, built-in or plug-in.

    ``y = layer(x)`` normalizes, ``dx = layer.backward(dy)`` returns the
    input gradient of the most recent forward and fills ``layer.grads``
    (parameter gradients by name); ``train()`` / ``eval()`` switch mode;
    ``state_dict()`` / ``load_state_dict()`` save and restore the arrays
    named in :attr:`state_names`.  The layer keeps a reference to its last
    input (not a copy) for the backward, as an autograd tape would, and
    keeps its state where its input lives (a forward with a CUDA device
    array moves the state to the device; one with a host array moves it
    back).

    A scheme overrides

    - :meth:`view` only, when it normalizes each group of a view with the
      group's own statistics (set :attr:`centered` false for the root mean
      square about zero);
    - :meth:`_forward` ``(x) -> (y, saved)`` when it does more with the
      statistics, using :func:`normalize`, :func:`normalize_with_statistics`,
      :mod:`normkit.engine` and :class:`~normkit.backend.protocol.channelwise`
      functions; ``saved`` is a :class:`Saved` record (its ``extras`` hold
      the scheme's own arrays);
    - :meth:`_backward` ``(dy, x, saved) -> (dx, grads)`` when its gradient
      is not :func:`normalize_backward`'s.

    ``x`` reaching :meth:`_forward` and ``dy`` reaching :meth:`_backward`
    have been checked once by the base class: float16/32/64 arrays (host or
    device), ``dy`` of the input's shape.

    Parameters
    ----------
    param_shape : tuple of int or None, default None
        Shape of ``weight`` (ones) and ``bias`` (zeros); None: no affine
        parameters.
    eps : float, default 1e-5
        Added to the variance, ``>= 0``.
    bias : bool, default True
        With ``param_shape``, whether there is a ``bias`` besides the
        ``weight`` (False: a gain only, as in RMSNorm).

    Examples
    --------
    A scheme that normalizes each row of a 2-D input (LayerNorm's view):

    >>> import numpy as np
    >>> import normkit
    >>> class RowNorm(normkit.Normalizer):
    ...     def view(self, shape):
    ...         return normkit.View(P=shape[0], A=1, K=1, J=shape[1], B=1)
    >>> layer = RowNorm()
    >>> y = layer(np.arange(6.0).reshape(2, 3))
    >>> bool(np.allclose(y.mean(axis=1), 0.0))
    True
    """

    #: Names of the arrays (and counters) that make up the state; None
    #: values are skipped.  Subclasses with more state extend it as a class
    #: attribute, e.g. ``state_names = Normalizer.state_names + ("mix",)``.
    state_names = ("weight", "bias")

    #: False: the default forward normalizes by the root mean square about
    #: zero, ``x / sqrt(mean(x**2) + eps)``, instead of centering first.
    centered = True

    def __init__(self, param_shape=None, eps=1e-5, bias=True):
        self.eps = check_eps(eps, type(self).__name__)
        self.weight = None if param_shape is None else np.ones(param_shape)
        self.bias = (None if param_shape is None or not bias
                     else np.zeros(param_shape))
        self.training = True
        self.grads = {}
        self._tape = None

    @classmethod
    def bound(cls, label, training, **state):
        """A scheme object over the caller's own arrays, for a functional
        form: no constructor runs, nothing is copied or allocated; ``state``
        sets its attributes (parameters, running statistics, settings) and
        ``label`` names it in errors and :class:`Saved` records.  The
        functional forms (:func:`normkit.batch_norm`, ...) validate their
        arguments, bind, and run the scheme's :meth:`_forward`.
        """
        self = cls.__new__(cls)
        self._label = label
        self.training = bool(training)
        self.grads = {}
        self._tape = None
        for name, value in state.items():
            setattr(self, name, value)
        return self

    @property
    def label(self):
        """The name errors and :class:`Saved` records use: the class name,
        or the function's name when a functional form runs the scheme."""
        return getattr(self, "_label", None) or type(self).__name__

    # ---- the extension point -------------------------------------------

    def view(self, shape):
        """Canonical :class:`~normkit.view.View` of an input of ``shape``.

        Override this (and nothing else) for a scheme that normalizes each
        group of the view with its own statistics; raise ``ValueError`` for
        shapes the scheme does not accept.
        """
        raise NotImplementedError(f"{self.label} must implement view() or "
                                  f"_forward()")

    def _forward(self, x, out=None):
        """Return ``(y, saved)``; the default normalizes over :meth:`view`
        with the input's statistics, ``weight`` and ``bias``.

        ``out`` (checked by the caller, possibly ``x`` itself) is where
        ``y`` goes; a subclass may leave it out of its signature, and its
        result is then copied there (:func:`forward_into`)."""
        view = self.view(x.shape)
        size = view.K * view.J
        if self.weight is not None and self.weight.size != size:
            raise ValueError(f"{self.label}: weight has {self.weight.size} "
                             f"values but the input needs {size}")
        return normalize(x, view, self.weight, self.bias, self.eps,
                         return_saved=True, variant=self.label,
                         centered=self.centered, out=out)

    def _backward(self, dy, x, saved, dx_out=None):
        """Return ``(dx, grads)`` for the ``saved`` record of
        :meth:`_forward`.

        The default is :func:`normalize_backward`, with ``grads`` holding
        ``weight`` and ``bias`` where the layer has them, and ``dx``
        written into ``dx_out`` when given (a subclass may leave
        ``dx_out`` out of its signature: its ``dx`` is then copied there).
        """
        dx, dweight, dbias = normalize_backward(dy, x, saved, dx_out=dx_out)
        grads = {name: grad for name, grad in (("weight", dweight),
                                               ("bias", dbias))
                 if getattr(self, name) is not None}
        return dx, grads

    # ---- the protocol ----------------------------------------------------

    def forward(self, x, out=None):
        """Normalize ``x``; remembers what the backward needs.

        Parameters
        ----------
        x : array
            float16, float32 or float64, host or device.
        out : array, optional
            Where to write the result, returned: ``x``'s shape and dtype,
            on its side (host or device), writeable, any layout; checked
            before anything is computed or updated.  ``out=x`` normalizes
            in place (inference with running statistics is an elementwise
            map; with batch statistics the statistics are complete before
            ``y`` is written); the input is then gone, so :meth:`backward`
            of that forward raises.

        Returns
        -------
        y : array, shape and dtype of ``x`` (``out`` when given)
        """
        if backend.is_device_array(x):
            x = backend.as_device_array(x)
        check_input(x, "x", self.label)
        if out is not None:
            if backend.is_device_array(out):
                out = backend.same_device(self.label, {"x": x, "out": out})["out"]
            check_out(out, x, self.label)
        self._follow(x)
        y, saved = forward_into(self, x, out)
        in_place = out is not None and overlap(out, x) != "none"
        self._tape = (None if in_place else x, saved)
        return y

    __call__ = forward

    def backward(self, dy, dx_out=None):
        """Gradient with respect to the input of the most recent forward.

        Sets ``self.grads`` to the parameters' gradients by name (e.g.
        ``{"weight": dweight, "bias": dbias}``; empty without parameters),
        and returns ``dx``.  Bad ``dy`` raises and leaves ``grads`` as it
        was.

        Parameters
        ----------
        dy : array
            Gradient with respect to the forward's output.
        dx_out : array, optional
            Where to write ``dx``, returned: the input's shape and dtype on
            its side; ``dy`` itself for a backward in place.

        Returns
        -------
        dx : array (``dx_out`` when given)
        """
        if self._tape is None:
            raise RuntimeError(f"{self.label}.backward called before any "
                               f"forward")
        x, saved = self._tape
        if x is None:
            raise RuntimeError(f"{self.label}.backward: the last forward wrote "
                               f"its output over its input (out=x), and the "
                               f"backward needs that input; run the forward "
                               f"with another out")
        if backend.is_device_array(dy):
            dy = backend.as_device_array(dy)
        check_input(dy, "dy", f"{self.label}.backward")
        if dy.shape != x.shape:
            raise ValueError(f"{self.label}.backward: dy must have the forward "
                             f"input's shape {x.shape}, got {dy.shape}")
        if dx_out is not None:
            func = f"{self.label}.backward"
            if backend.is_device_array(dx_out):
                dx_out = backend.same_device(func, {"x": x, "dx_out": dx_out}
                                             )["dx_out"]
            check_out(dx_out, x, func, "dx_out")
            check_out(dx_out, dy, func, "dx_out", "dy")
        dx, self.grads = backward_into(self, dy, x, saved, dx_out)
        return dx

    def _follow(self, x):
        """Move the state arrays to where ``x`` lives (device or host)."""
        on_device = not isinstance(x, np.ndarray)
        for name in self.state_names:
            value = getattr(self, name, None)
            if (value is not None and not isinstance(value, int)
                    and isinstance(value, np.ndarray) == on_device):
                move = backend.to_device if on_device else backend.to_host
                setattr(self, name, move(value))

    def train(self, mode=True):
        """Switch to training mode (``mode=False``: inference); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Switch to inference mode; returns self."""
        return self.train(False)

    def state_dict(self):
        """Host NumPy copies of the state arrays, keyed by name (counters
        as 0-d integer arrays)."""
        state = {}
        for name in self.state_names:
            value = getattr(self, name, None)
            if value is not None:
                state[name] = backend.to_host(value)
        return state

    def load_state_dict(self, state):
        """Load arrays saved by :meth:`state_dict`.

        Missing, unexpected or mis-shaped entries raise (KeyError or
        ValueError naming them) and then nothing is changed.
        """
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise KeyError(f"{self.label}.load_state_dict: missing "
                           f"keys {missing}, unexpected keys {extra}")
        loaded = {}
        for name, current in own.items():
            value = np.asarray(state[name])
            if value.shape != current.shape:
                raise ValueError(f"{self.label}.load_state_dict: "
                                 f"{name} must have shape {current.shape}, got "
                                 f"{value.shape}")
            if value.dtype.kind not in "fiu" or (value.dtype.kind != "f"
                                                  and current.dtype.kind == "f"):
                raise ValueError(f"{self.label}.load_state_dict: "
                                 f"{name} must have a {current.dtype} "
                                 f"compatible dtype, got {value.dtype}")
            loaded[name] = value.astype(current.dtype)
        for name, value in loaded.items():
            if value.ndim == 0:
                value = int(value)
            elif backend.is_device_array(getattr(self, name)):
                value = backend.to_device(value)
            setattr(self, name, value)

    def extra_repr(self):
        return f"eps={self.eps}"

    def __repr__(self):
        return f"{self.label}({self.extra_repr()})"



class RunningStatsNormalizer(Normalizer):
    """Base of schemes with per-channel running statistics and a batch
    counter, with PyTorch's semantics.

    State: ``weight`` and ``bias`` (``(num_features,)``, when ``affine``),
    ``running_mean`` (zeros) and the running spread named by
    :attr:`spread_name` (``running_var``, ones; Batch Renormalization's
    ``running_std``), and ``num_batches_tracked`` (0), the last three when
    ``track_running_stats``.  :meth:`update_running_stats` is the running
    update every built-in uses; :meth:`reset_running_stats` restores the
    initial values.

    Parameters
    ----------
    num_features : int
        Channels ``C`` (the size of ``axis``).
    eps : float, default 1e-5
        Added to the variance, ``>= 0``.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch, ``running = (1 - momentum) * running +
        momentum * batch``; None: cumulative average over the batches
        counted by ``num_batches_tracked``.
    affine : bool, default True
        Learnable ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep running statistics (else None).
    axis : int, default 1
        Channel axis: 1 channels-first, -1 channels-last.
    bias : bool, default True
        Keyword only, as in PyTorch 2.13: with ``affine``, whether there is
        a ``bias`` besides the ``weight``.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> class MeanOnlyBN(normkit.RunningStatsNormalizer):
    ...     '''Subtract the batch mean; the spread is left alone.'''
    ...     def _forward(self, x):
    ...         view = normkit.View(1, x.shape[0], x.shape[1], 1, 1)
    ...         mean, _ = normkit.engine.moments(x, view)
    ...         if self.training:
    ...             self.update_running_stats(mean, None, view.group_size)
    ...         else:
    ...             mean = self.running_mean
    ...         return normkit.normalize_with_statistics(
    ...             x, view, mean, np.ones(x.shape[1]), variant=self.label)
    >>> layer = MeanOnlyBN(3, affine=False)
    >>> _ = layer(np.arange(12.0).reshape(4, 3))
    >>> layer.running_mean.tolist(), layer.num_batches_tracked
    ([0.45, 0.55, 0.65], 1)
    """

    state_names = ("weight", "bias", "running_mean", "running_var",
                   "num_batches_tracked")

    #: Name of the running spread buffer (``running_var`` or ``running_std``).
    spread_name = "running_var"

    #: Initial value of the running spread.
    spread_init = 1.0

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, *, bias=True):
        self.num_features = check_positive_int(num_features, "num_features",
                                               type(self).__name__)
        super().__init__((self.num_features,) if affine else None, eps,
                         bias=bias)
        check_momentum(momentum, type(self).__name__)
        self.momentum = momentum
        self.axis = axis
        self.track_running_stats = bool(track_running_stats)
        self.reset_running_stats()

    def reset_running_stats(self):
        """Zero mean, initial spread, no batches counted."""
        track = self.track_running_stats
        self.running_mean = np.zeros(self.num_features) if track else None
        setattr(self, self.spread_name,
                np.full(self.num_features, self.spread_init) if track else None)
        self.num_batches_tracked = 0 if track else None

    def update_running_stats(self, mean, var, n):
        """Fold one batch's statistics into the running ones and count it.

        ``mean`` and ``var`` are ``(P, C)`` rows (averaged over ``p``) of
        the batch mean and biased variance of groups of ``n`` values (either
        may be None to leave that buffer alone); ``running_var`` receives
        the unbiased ``n / (n - 1) * var``, with the weight of
        :func:`momentum_factor`.  Does nothing unless
        ``track_running_stats``.

        A batch without values (``n == 0``, or rows of no groups) leaves
        the running statistics alone and is still counted, as PyTorch's
        ``BatchNorm*d`` do with an empty batch.
        """
        if not self.track_running_stats:
            return
        if n != 0 and _has_rows(mean) and _has_rows(var):
            factor = momentum_factor(self.momentum, self.num_batches_tracked)
            spread = getattr(self, self.spread_name)
            if mean is not None and var is not None:
                _moving_averages(self.running_mean, _batch_row(mean), spread,
                                 _batch_row(var), factor, _unbiased_scale(n),
                                 out=(self.running_mean, spread))
            elif mean is not None:
                update_running(self.running_mean, mean, factor)
            elif var is not None:
                update_running(spread, var, factor, n)
        self.num_batches_tracked += 1

    def normalize_running(self, x, view, out=None):
        """Inference with the running statistics: ``(y, saved)`` of
        :func:`normalize_with_statistics` with ``running_mean`` and
        ``1 / sqrt(running_var + eps)`` (``y`` written into ``out`` when
        given, ``x`` itself included)."""
        return normalize_with_statistics(
            x, view, self.running_mean, inverse_std(self.running_var, self.eps),
            self.weight, self.bias, variant=self.label, out=out)

    def normalize_tracked(self, x, view, out=None):
        """Normalize with the statistics of each group of ``view`` and, in
        training, fold them into the running statistics
        (:meth:`update_running_stats`): ``(y, saved)`` (``y`` written into
        ``out`` when given)."""
        y, saved = normalize(x, view, self.weight, self.bias, self.eps,
                             return_saved=True, variant=self.label, out=out)
        if self.training:
            self.update_running_stats(saved.mean, saved.var, view.group_size)
        return y, saved

    def extra_repr(self):
        no_bias = ", bias=False" if self.weight is not None and self.bias is None else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}{no_bias}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}")
