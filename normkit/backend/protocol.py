"""What every backend provides, and per-channel arithmetic written once.

A backend is a module implementing the operations of :class:`Backend` for
the arrays that live on its device; :func:`normkit.backend.backend_for`
picks it from the input.  The operations know no normalizer: they see a
:class:`~normkit.view.View` ``(P, A, K, J, B)`` of a contiguous input,
statistics per group ``(p, k)`` reduced over ``(a, j, b)``, and affine
parameters per ``(k, j)``.  Statistics, partials and sums are float64
arrays of the backend (NumPy arrays on the CPU, device arrays on CUDA).

Every normalizer (built-in or plug-in) is written with these operations,
through :mod:`normkit.engine`, which dispatches each call to the input's
backend, and with :class:`channelwise` functions for the arithmetic on
per-channel statistic rows (running averages, corrections, clips), which
compile for both devices from one scalar function.
"""

import inspect
import math
from typing import Protocol

import numpy as np
from numba.extending import register_jitable

from . import backend_for

__all__ = ["Backend", "channelwise", "chan_merge", "dx_coefficients",
           "inverse_sqrt", "inverse_std", "reciprocal", "product", "copy",
           "merge_summaries", "normalize_in_steps"]


class Backend(Protocol):
    """The operations of a backend (a module: :mod:`normkit.backend.cpu`,
    :mod:`normkit.backend.cuda`).  ``x`` and ``dy`` are arrays of the
    backend of any shape with ``view.P * ... * view.B`` values.

    A view with a zero dimension has no values: a backend launches nothing
    for it and returns empty outputs, NaN statistics (the mean of no
    values) and zero sums.  Division by a zero variance (``eps = 0``)
    gives inf and NaN as IEEE arithmetic does; no operation raises.

    The operations that produce an array of the input's size
    (:meth:`apply_affine`, :meth:`normalize_batch`, :meth:`dx_from_sums`,
    :meth:`backward`, :meth:`map_view`) take ``out``: an array of the
    backend with ``x``'s shape and dtype (any layout; the caller checks
    it, :func:`normkit.checks.check_out`), written and returned instead of
    a new array.  The kernels write a C-contiguous ``out`` directly (a
    float16 one on the CPU after the float32 kernels, one conversion) and
    any other through one copy.  ``out`` may be the input itself (``x``,
    or ``dy`` in a backward), the same memory in the same layout: the
    elementwise maps read and write each position once, and the
    statistics or sums are complete before the map begins, so every one
    of these operations is correct in place (on the CPU the last bit may
    differ from a separate ``out``: LLVM runs the vectorized version of a
    loop only where its buffers do not alias); an ``out`` overlapping an
    input partially is not allowed."""

    def moment_partials(self, x, view):
        """Mergeable moments ``(P, chunks, K, 3)``: ``(n, mean, M2)`` of each
        chunk of each group, with ``M2 = sum (x - mean)**2`` over the chunk.
        Partials from several arrays (or processes) concatenated along axis
        1 merge with :meth:`merge_partials` exactly as one array's do."""

    def merge_partials(self, partials, centered=True):
        """Merge ``(P, chunks, K, 3)`` partials in chunk order (Chan's
        formula, :func:`chan_merge`) into the mean and biased variance
        ``M2 / n``, two ``(P, K)`` arrays; ``centered=False`` gives zero and
        the mean square ``var + mean**2`` instead."""

    def moments(self, x, view, centered=True):
        """``merge_partials(moment_partials(x, view), centered)``, except
        that with ``centered=False`` a mean square that comes out NaN (an
        infinite value leaves ``M2`` NaN) is ``mean(x**2)`` summed again
        over the group: +inf, NaN only where the group holds a NaN.
        :meth:`normalize_batch` and :meth:`normalize_transformed` use
        these statistics."""

    def normalize_batch(self, x, view, gamma=None, beta=None, eps=1e-5,
                        centered=True, out=None):
        """``(y, mean, var, rstd)``: ``y = (x - mean) * rstd * gamma +
        beta``, ``rstd = 1 / sqrt(var + eps)``, with the statistics of ``x``
        itself, fused into one pass over memory where every work item holds
        whole groups."""

    def normalize_transformed(self, x, view, transform, args, gamma=None,
                              beta=None, centered=True, out=None):
        """``(y, mean, var, results)``: ``results = transform(mean, var,
        *args)``, each ``(P, K)``, and ``y = (x - results[0]) * results[1]
        * gamma + beta``, with the statistics of ``x`` itself; the
        transform runs per group inside the fused pass of
        :meth:`normalize_batch` where there is one (else
        :func:`normalize_in_steps`).  ``args`` are numbers or arrays of
        ``P * K`` values (:func:`normkit.engine.normalize_transformed`
        checks them)."""

    def apply_affine(self, x, view, mean, alpha, gamma=None, beta=None,
                     out=None):
        """``y = (x - mean) * alpha * gamma + beta`` in ``x.dtype``, with
        ``mean`` and ``alpha`` per group (``P * K`` values, or ``K`` shared
        by every ``p``) and ``gamma``, ``beta`` per ``(k, j)``."""

    def backward_sums(self, dy, x, view, mean, rstd, gscale=None,
                      centered=True):
        """Backward reductions with ``xhat = (x - mean) * rstd``:
        ``(group, affine)``, where ``group`` is the pair of ``(P, K)``
        arrays ``(sum g*dy, sum g*dy*xhat)`` per group (``g = gscale`` per
        ``(k, j)``, 1 when None) and ``affine`` the pair of ``(K*J,)``
        arrays ``(sum dy, sum dy*xhat)`` per ``(k, j)``."""

    def dx_from_sums(self, dy, x, view, mean, rstd, gscale, group_sums, n,
                     centered=True, out=None):
        """``dx = rstd * (g*dy - S0/n - xhat * S1/n)`` with ``(S0, S1) =
        group_sums``, a pair of per-group arrays as :meth:`backward_sums`
        returns (``n = inf``: fixed statistics,
        ``dx = g * dy * rstd``)."""

    def backward(self, dy, x, view, mean, rstd, gscale=None, batch_stats=True,
                 need_affine=True, centered=True, out=None, affine_out=None):
        """``(dx, sum dy, sum dy*xhat)``: :meth:`backward_sums` then
        :meth:`dx_from_sums` with ``n = A*J*B`` (``inf`` unless
        ``batch_stats``), fused where groups fit one work item.
        ``affine_out``, a pair of arrays of ``K*J`` values (any float
        dtype, the backend's) or None, is where the caller wants the two
        affine sums: a backend may write them there itself, rounded once
        from their float64 accumulation, and return those two arrays;
        otherwise it returns float64 sums, which
        :func:`normkit.engine.backward` converts into them."""

    def map_view(self, function, view, args, kinds, out):
        """Run a :class:`channelwise` function over every element of an
        input of ``view`` (:meth:`channelwise.over`); ``out`` is None or a
        tuple of one array per output."""

    def map_channels(self, function, args, out):
        """Run a :class:`channelwise` function elementwise over ``args``."""

    def copy_into(self, out, a):
        """``out[...] = a`` for two arrays of the backend of one shape;
        returns ``out``."""

    def empty(self, shape, dtype):
        """An uninitialized array of the backend."""


# --------------------------------------------------------------------------
# scalar functions shared by the kernels of both backends
# --------------------------------------------------------------------------

def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two ``(count, mean, M2)`` summaries (Chan, Golub and LeVeque):
    ``n = n_a + n_b``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``, ``delta = mean_b -
    mean_a``.  Compiled by each backend for its kernels."""
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@register_jitable
def inverse_sqrt(v):
    """``1 / sqrt(v)`` for ``v >= 0`` or NaN: inf for 0, NaN for NaN, as
    IEEE arithmetic gives on every device, written so that Numba's CUDA
    simulator (plain Python, where ``1.0 / 0.0`` raises) gives them too.
    Compiled by each backend for its kernels."""
    if v > 0.0:
        return 1.0 / math.sqrt(v)
    if v == 0.0:
        return math.inf
    return math.nan


def dx_coefficients(rstd, sum_g, sum_gx, n, centered):
    """``(h, c)`` of ``dx = rstd * g*dy + h * (x - mean) + c`` for one group
    from its sums ``sum_g = sum g*dy`` and ``sum_gx = sum g*dy*xhat`` over
    ``n`` values: ``h = -rstd**2 * sum_gx / n`` and ``c = -rstd * sum_g / n``
    (0 when not ``centered``: the mean's gradient term drops out).
    ``n = inf`` (fixed statistics) gives zeros."""
    h = -rstd * rstd * sum_gx / n
    c = -rstd * sum_g / n if centered else 0.0
    return h, c


# --------------------------------------------------------------------------
# per-channel arithmetic, once for both backends
# --------------------------------------------------------------------------

class channelwise:
    """Per-channel arithmetic written once as a scalar function.

    Decorate a function of floats that returns one float, or a tuple of
    ``outputs`` floats; calling the decorated object with arrays applies it
    elementwise (in float64) on the arrays' backend, compiled with Numba
    for the CPU and with ``numba.cuda`` for device arrays.  Arguments may be
    arrays of one common size (any shape) or Python numbers; the results
    are flat float64 arrays of that size, or are written into ``out`` (an
    array, or a tuple of ``outputs`` arrays, of that size, any float dtype;
    ``out`` may be an input, for updates in place).

    Parameters
    ----------
    function : callable, optional
        The scalar function (when used as ``@channelwise``).
    outputs : int, default 1
        How many floats it returns (as ``@channelwise(outputs=n)``).

    Examples
    --------
    >>> import numpy as np
    >>> from normkit.backend import channelwise
    >>> @channelwise(outputs=2)
    ... def scale_and_shift(mean, var, eps):
    ...     rstd = 1.0 / (var + eps) ** 0.5
    ...     return rstd, -mean * rstd
    >>> a, b = scale_and_shift(np.array([1.0, 2.0]), np.array([4.0, 1.0]), 0.0)
    >>> a.tolist(), b.tolist()
    ([0.5, 1.0], [-0.5, -2.0])
    """

    def __init__(self, function=None, *, outputs=1):
        if not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"channelwise: outputs must be a positive int, "
                             f"got {outputs!r}")
        self.outputs = outputs
        self.function = None
        if function is not None:
            self._wrap(function)

    def _wrap(self, function):
        self.function = function
        self.arity = len(inspect.signature(function).parameters)
        self.__name__ = function.__name__
        self.__doc__ = function.__doc__
        self.compiled = {}          # backend caches, keyed as they choose
        return self

    def __call__(self, *args, out=None):
        if self.function is None:    # @channelwise(outputs=n) form
            (function,) = args
            return self._wrap(function)
        if len(args) != self.arity:
            raise TypeError(f"{self.__name__}: expected {self.arity} "
                            f"arguments, got {len(args)}")
        first = None
        for a in args:
            if type(a) is not np.ndarray and is_number(a):
                continue
            if first is None:
                first = a
            elif a.size != first.size:
                raise ValueError(f"{self.__name__}: array arguments must have "
                                 f"one size, got {first.size} and {a.size}")
        if first is None:
            raise TypeError(f"{self.__name__}: at least one argument must be "
                            f"an array")
        if out is not None and not isinstance(out, tuple):
            out = (out,)
        if out is not None and len(out) != self.outputs:
            raise ValueError(f"{self.__name__}: out must hold {self.outputs} "
                             f"arrays, got {len(out)}")
        result = backend_for(first).map_channels(self, args, out)
        return result[0] if self.outputs == 1 else result

    def over(self, view, *args, out=None):
        """Apply the function to every element of an input of ``view``.

        Each argument is an array of the input's size (read elementwise),
        a ``(P, K)`` array (read per statistics group), an array of
        ``K * J`` values (read per channel, the affine parameters' layout),
        an array of one value (read as a scalar: a learnable scalar, or an
        entry ``a[k:k+1]`` of a small array, that stays on the device) or a
        number.  The results have the shape and dtype of the first
        input-sized argument (float16 included), or are written into
        ``out``.  Elementwise post-ops (an activation after the
        normalization, a mask in a backward) are written this way once for
        both backends.

        An argument that fits several kinds is read as the first of full,
        per group, per channel, one value; these agree wherever they
        overlap (an array of one value is also a ``(1, 1)`` group or the
        only channel when the view has one).

        Examples
        --------
        >>> import numpy as np
        >>> import normkit
        >>> @normkit.channelwise
        ... def clamp_below(y, tau):
        ...     return max(y, tau)
        >>> y = np.arange(-2.0, 4.0).reshape(1, 2, 3)      # (N, C, S)
        >>> view = normkit.View(1, 1, 2, 1, 3)             # channels on axis 1
        >>> clamp_below.over(view, y, np.array([0.0, 2.5])).tolist()
        [[[0.0, 0.0, 0.0], [2.5, 2.5, 3.0]]]

        A threshold held in a one-value array (on the device for device
        input) is broadcast to every element:

        >>> clamp_below.over(view, y, np.array([1.0])).tolist()
        [[[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]]
        """
        if len(args) != self.arity:
            raise TypeError(f"{self.__name__}: expected {self.arity} "
                            f"arguments, got {len(args)}")
        kinds = tuple(view_kind(a, view) for a in args)
        if "full" not in kinds:
            raise ValueError(f"{self.__name__}.over: one argument must have "
                             f"the input's {math.prod(view.dims)} values")
        full = args[kinds.index("full")]
        if out is not None and not isinstance(out, tuple):
            out = (out,)
        result = backend_for(full).map_view(self, view, args, kinds, out)
        return result[0] if self.outputs == 1 else result


def normalize_in_steps(backend, x, view, transform, args, gamma, beta,
                       centered, out):
    """:meth:`Backend.normalize_transformed` in three of ``backend``'s
    operations: :meth:`~Backend.moments`, the transform over the groups'
    statistics, :meth:`~Backend.apply_affine`; for a backend, or a plan,
    without a fused pass (two passes over memory)."""
    mean, var = backend.moments(x, view, centered)
    results = transform(mean, var, *args)
    results = tuple(r.reshape(view.P, view.K) for r in results)
    y = backend.apply_affine(x, view, results[0], results[1], gamma, beta, out)
    return y, mean, var, results


def is_number(a):
    """True for Python and NumPy numbers, which :class:`channelwise`
    passes to its function as they are (bools are not numbers here)."""
    return type(a) in _NUMBER_TYPES or isinstance(a, np.number)


_NUMBER_TYPES = frozenset((int, float))


def _size(a):
    return math.prod(a.shape)


def loop_source(arity, outputs, reads, header, params="",
                write="o{k}[i] = {value}"):
    """Python source of the loop both backends compile for a
    :class:`channelwise` function named ``f``: argument ``n`` is read as
    ``reads[n]`` (an expression of the loop index ``i``), output ``k`` is
    written by the statement ``write`` (formatted with ``k`` and the
    ``value``); ``header`` opens the loop over ``i`` and ``params`` are
    extra integer parameters the reads use."""
    arguments = ", ".join(f"float64({read})" for read in reads)
    writes = "\n".join(
        "        " + write.format(k=k, value=f"r[{k}]" if outputs > 1 else "r")
        for k in range(outputs))
    names = ", ".join([f"a{n}" for n in range(arity)]
                      + [f"o{k}" for k in range(outputs)]
                      + ([params] if params else []))
    return f"def loop({names}):\n{header}        r = f({arguments})\n{writes}\n"


def plain_reads(scalars):
    """Reads of :meth:`channelwise.__call__`: element ``i`` of every array."""
    return [f"a{n}" if scalar else f"a{n}[i]" for n, scalar in enumerate(scalars)]


#: Integer parameters of :meth:`channelwise.over` loops.
VIEW_PARAMS = "B, KJ, PS, JB, K"

#: How :meth:`channelwise.over` reads each kind of argument at flat index
#: ``i`` of the view ``(P, A, K, J, B)``: ``PS = A*K*J*B`` values per ``p``,
#: ``JB = J*B`` per ``(p, a, k)``.
VIEW_READS = {"scalar": "a{n}", "full": "a{n}[i]",
              "channel": "a{n}[(i // B) % KJ]",
              "group": "a{n}[(i // PS) * K + (i // JB) % K]",
              "one": "a{n}[0]"}


def view_kind(a, view):
    """How :meth:`channelwise.over` broadcasts argument ``a`` over ``view``."""
    if is_number(a):
        return "scalar"
    size = _size(a)
    if size == math.prod(view.dims):
        return "full"
    if tuple(a.shape) == (view.P, view.K):
        return "group"
    if size == view.K * view.J:
        return "channel"
    if size == 1:
        return "one"
    raise ValueError(f"channelwise.over: an argument of shape "
                     f"{tuple(a.shape)} fits neither the input "
                     f"({math.prod(view.dims)} values), nor its groups "
                     f"({view.P}, {view.K}), nor its {view.K * view.J} "
                     f"channels, nor is it one value (view {view})")


def view_params(view):
    """The values of :data:`VIEW_PARAMS` for ``view``."""
    P, A, K, J, B = view.dims
    return B, K * J, A * K * J * B, J * B, K


# --------------------------------------------------------------------------
# common per-channel maps
# --------------------------------------------------------------------------

@channelwise
def inverse_std(var, eps):
    """``1 / sqrt(var + eps)`` (inf where ``var + eps`` is 0)."""
    return inverse_sqrt(var + eps)


@channelwise
def reciprocal(a):
    """``1 / a``."""
    return 1.0 / a


@channelwise
def product(a, b):
    """``a * b``."""
    return a * b


@channelwise
def copy(a):
    """``a`` (with ``out=``: converted to ``out``'s dtype and shape)."""
    return a


#: Chan's merge (:func:`chan_merge`) of two ``(n, mean, M2)`` summaries,
#: per channel on either backend: ``n, mean, m2 = merge_summaries(n_a,
#: mean_a, m2_a, n_b, mean_b, m2_b)`` (rows of processes, of chunks, ...).
merge_summaries = channelwise(outputs=3)(chan_merge)
