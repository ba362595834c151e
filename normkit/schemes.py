"""RMSNorm, Ghost BatchNorm, Weight and Spectral Normalization.

These members of the family are built only through the public extension
path (:class:`normkit.Normalizer`, :class:`normkit.View`,
:func:`normkit.normalize` / :func:`normkit.normalize_backward` and the
engine's entry points); none has a reduction loop of its own:

- **RMSNorm** is LayerNorm's view with the statistics taken about zero
  (``centered=False``, an engine capability).
- **Ghost BatchNorm** is BatchNorm's view with the batch axis split into
  ``N / v`` statistics groups of ``v`` samples.
- **Weight Normalization** ``w = g * v / ||v||`` is RMS normalization of
  the weight over each output unit with gain ``g / sqrt(n)`` and ``eps = 0``
  (``||v|| = sqrt(n * mean(v**2))``), so its backward is the engine's too.
- **Spectral Normalization** ``w / sigma(w)`` takes its power iteration's
  vector norms from the engine's moments.

Weight and Spectral Normalization reparametrize a weight array rather than
normalize activations: their layers (:class:`Reparametrization`) take the
raw weight as input, ``w = layer(v)``, and their backward maps the gradient
with respect to ``w`` to the one with respect to the raw weight.
"""

import dataclasses
import math

import numpy as np

from . import _device, engine
from . import functional as F
from ._checks import (check_axis, check_eps, check_input, check_momentum,
                      check_ndim, check_param, check_positive_int,
                      check_running)
from .engine import View
from .layers import Normalizer, RunningStatsNormalizer

__all__ = [
    "rms_norm", "rms_norm_backward", "ghost_batch_norm",
    "ghost_batch_norm_backward", "weight_norm", "weight_norm_backward",
    "spectral_norm", "spectral_norm_backward", "RMSNorm", "GhostBatchNorm",
    "Reparametrization", "WeightNorm", "SpectralNorm",
]


# --------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------

def _rms_eps(eps, dtype, func):
    """``eps``, or for None the machine epsilon of ``dtype`` (torch's rule)."""
    return float(np.finfo(dtype).eps) if eps is None else check_eps(eps, func)


@_device.accepts_device_arrays
def rms_norm(x, normalized_shape, weight=None, eps=None, *, return_saved=False):
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

    Returns
    -------
    y : ndarray, or (y, saved)
    """
    func = "rms_norm"
    view = F._trailing_input(func, x, normalized_shape, weight)
    eps = _rms_eps(eps, x.dtype, func)
    return F.normalize(x, view, weight, None, eps, return_saved=return_saved,
                       variant=func, centered=False)


def rms_norm_backward(dy, x, saved):
    """Backward of :func:`rms_norm`: ``(dx, dweight)``.

    With ``g = weight * dy`` and ``xhat = x * rstd`` over each row of ``n``
    values, ``dx = rstd * (g - xhat * mean(g * xhat))`` and
    ``dweight = sum(dy * xhat)`` over the leading axes.
    """
    dx, dweight, _ = F.normalize_backward(dy, x, saved, "rms_norm")
    return dx, dweight


class RMSNorm(Normalizer):
    """RMSNorm over the trailing ``normalized_shape`` axes; see
    :func:`rms_norm`.

    Arguments as ``torch.nn.RMSNorm``: ``elementwise_affine`` gives a gain
    ``weight`` of shape ``normalized_shape`` (initialized to ones) and no
    bias; ``eps=None`` is the machine epsilon of the input's dtype.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True):
        self.normalized_shape = F._normalized_shape(normalized_shape, "RMSNorm")
        super().__init__(self.normalized_shape if elementwise_affine else None,
                         bias=False)
        self.eps = None if eps is None else check_eps(eps, "RMSNorm")

    def _forward(self, x):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps,
                        return_saved=True)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


# --------------------------------------------------------------------------
# Ghost BatchNorm
# --------------------------------------------------------------------------

def ghost_view(shape, axis, virtual_batch_size):
    """BatchNorm's view of ``shape`` with one statistics group per channel
    and virtual batch: ``P = N / v`` blocks of ``v`` consecutive samples.

    Raises ValueError unless ``virtual_batch_size`` divides ``N``.
    """
    n = shape[0]
    if n % virtual_batch_size:
        raise ValueError(f"ghost_batch_norm: virtual_batch_size must divide "
                         f"the batch size {n} when ghost-batch statistics are "
                         f"used (training, or no running statistics), got "
                         f"virtual_batch_size={virtual_batch_size} (input "
                         f"shape {shape})")
    whole = engine.channel_view(shape, axis, per_sample=False)
    ghosts = n // virtual_batch_size
    return View(ghosts, whole.A // ghosts, whole.K, whole.J, whole.B)


@_device.accepts_device_arrays
def ghost_batch_norm(x, virtual_batch_size, running_mean=None,
                     running_var=None, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5, axis=1, *,
                     num_batches_tracked=None, return_saved=False):
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

    Returns
    -------
    y : ndarray, or (y, saved)
    """
    func = "ghost_batch_norm"
    ax, C = F._check_channel_input(
        func, x, axis, weight, bias, min_axis=1,
        running=(("running_mean", running_mean), ("running_var", running_var)))
    v = check_positive_int(virtual_batch_size, "virtual_batch_size", func)
    eps = check_eps(eps, func)
    updating = bool(training) and running_mean is not None
    factor = check_momentum(momentum, func, num_batches_tracked, updating)
    if not (training or running_mean is None):
        y, saved = F.batch_norm(x, running_mean, running_var, weight, bias,
                                False, momentum, eps, ax, return_saved=True)
        saved = dataclasses.replace(saved, variant=func)
        return (y, saved) if return_saved else y
    view = ghost_view(x.shape, ax, v)
    n = view.group_size
    if n <= 1:
        raise ValueError(f"{func}: expected more than 1 value per channel in "
                         f"each virtual batch, got {n} (input size "
                         f"{tuple(x.shape)}, virtual_batch_size={v})")
    y, saved, var = F._normalize_batch(x, view, weight, bias, eps, func)
    if updating:
        _device.update_running(running_mean, saved.mean, factor)
        _device.update_running(running_var, var, factor, n)
    return (y, saved) if return_saved else y


def ghost_batch_norm_backward(dy, x, saved):
    """Backward of :func:`ghost_batch_norm`: ``(dx, dweight, dbias)``.

    In training each ghost batch is a statistics group of
    :func:`normkit.normalize_backward`; in inference ``dx = gamma * dy *
    rstd``.
    """
    return F.normalize_backward(dy, x, saved, "ghost_batch_norm")


class GhostBatchNorm(RunningStatsNormalizer):
    """Ghost Batch Normalization layer; see :func:`ghost_batch_norm`.

    Training normalizes each virtual batch of ``virtual_batch_size``
    samples with its own statistics (the batch size must be a multiple of
    it) and updates the running statistics once per call; inference is
    BatchNorm inference with them, for any batch size.
    """

    def __init__(self, num_features, virtual_batch_size, eps=1e-5,
                 momentum=0.1, affine=True, track_running_stats=True, axis=1):
        self.virtual_batch_size = check_positive_int(
            virtual_batch_size, "virtual_batch_size", "GhostBatchNorm")
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis)

    def _forward(self, x):
        updating = self.training and self.track_running_stats
        return self._counted(updating, lambda count: ghost_batch_norm(
            x, self.virtual_batch_size, self.running_mean, self.running_var,
            self.weight, self.bias, self.training, self.momentum, self.eps,
            self.axis, num_batches_tracked=count, return_saved=True))

    def extra_repr(self):
        return (f"{super().extra_repr()}, "
                f"virtual_batch_size={self.virtual_batch_size}")


# --------------------------------------------------------------------------
# Weight Normalization
# --------------------------------------------------------------------------

def _unit_view(v, axis, func):
    """Validated ``axis`` and the view with one group per unit along it."""
    check_input(v, "v", func)
    check_ndim(v, func, min_ndim=1, name="v")
    ax = check_axis(axis, v.ndim, func)
    return ax, engine.channel_view(v.shape, ax, per_sample=False)


@_device.accepts_device_arrays
def weight_norm(v, g, axis=0, *, return_saved=False):
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

    Returns
    -------
    w : ndarray, or (w, saved)
    """
    func = "weight_norm"
    ax, view = _unit_view(v, axis, func)
    check_param(g, "g", (v.shape[ax],), func)
    gain = g / math.sqrt(view.group_size)
    return F.normalize(v, view, gain, None, 0.0, return_saved=return_saved,
                       variant=func, centered=False)


def weight_norm_backward(dw, v, saved):
    """Backward of :func:`weight_norm`: ``(dv, dg)``.

    With ``vhat = v / ||v||`` per unit, ``dg = sum(dw * vhat)`` and
    ``dv = g / ||v|| * (dw - vhat * sum(dw * vhat))``: the engine's
    uncentered backward with gain ``g / sqrt(n)``.
    """
    dv, dgain, _ = F.normalize_backward(dw, v, saved, "weight_norm")
    return dv, dgain / math.sqrt(saved.view.group_size)


class Reparametrization(Normalizer):
    """Base of layers that reparametrize a weight array.

    The input of the layer is the raw weight, its output the weight the
    model uses, ``w = layer(v)``; ``layer.backward(dw)`` returns the
    gradient with respect to the raw weight and fills ``layer.grads`` with
    those of the layer's own parameters.  They are not activation
    normalizers: ``normkit compare`` and the benchmarks of activations
    skip them.
    """

    def __init__(self):
        super().__init__(None, eps=0.0)


class WeightNorm(Reparametrization):
    """Weight Normalization ``w = g * v / ||v||``; see :func:`weight_norm`.

    ``g`` (``num_units`` magnitudes, one per unit along ``axis``) is the
    layer's parameter; the input is ``v``.  ``g`` starts at ones; call
    :meth:`initialize` with the initial weight to start from ``w = v``,
    as ``torch.nn.utils.weight_norm`` does.
    """

    state_names = ("g",)

    def __init__(self, num_units, axis=0):
        super().__init__()
        self.g = np.ones(check_positive_int(num_units, "num_units",
                                            "WeightNorm"))
        self.axis = axis

    def _checked_view(self, v, func):
        """The unit view of ``v``; raises unless it has ``num_units`` units."""
        ax, view = _unit_view(v, self.axis, func)
        if v.shape[ax] != self.g.size:
            raise ValueError(f"{func}: expected {self.g.size} units on axis "
                             f"{self.axis}, got input shape {v.shape}")
        return view

    def initialize(self, v):
        """Set ``g = ||v||`` per unit, so that ``self(v)`` returns ``v``."""
        view = self._checked_view(v, "WeightNorm.initialize")
        _, mean_square = engine.moments(v, view, centered=False)
        self.g = np.sqrt(view.group_size * mean_square).reshape(-1)
        return self

    def _forward(self, v):
        self._checked_view(v, "WeightNorm")
        return weight_norm(v, self.g, self.axis, return_saved=True)

    def _backward(self, dw, v, saved):
        dv, dg = weight_norm_backward(dw, v, saved)
        return dv, {"g": dg}

    def extra_repr(self):
        return f"{self.g.size}, axis={self.axis}"


# --------------------------------------------------------------------------
# Spectral Normalization
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpectralSaved:
    """What :func:`spectral_norm` hands :func:`spectral_norm_backward`:
    the input's shape and dtype, the unit axis, ``sigma`` and copies of the
    vectors ``u`` and ``v`` it was computed with."""

    shape: tuple
    dtype: np.dtype
    axis: int
    sigma: float
    u: np.ndarray
    v: np.ndarray


def _as_matrix(w, axis):
    """``w`` as a float64 ``(w.shape[axis], -1)`` matrix."""
    return np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)


def _unit_vector(vector, eps):
    """``vector / max(||vector||, eps)``, the norm from the engine's moments."""
    _, mean_square = engine.moments(vector, View(1, 1, 1, vector.size, 1),
                                    centered=False)
    return vector / max(math.sqrt(vector.size * mean_square[0, 0]), eps)


def spectral_norm(w, u, v, n_power_iterations=1, eps=1e-12, training=True,
                  axis=0, *, return_saved=False):
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

    Returns
    -------
    y : ndarray, ``w / sigma`` in ``w.dtype``, or (y, saved)
    """
    func = "spectral_norm"
    check_input(w, "w", func)
    check_ndim(w, func, min_ndim=1, name="w")
    ax = check_axis(axis, w.ndim, func)
    rows = w.shape[ax]
    check_vector = check_running if training else check_param
    check_vector(u, "u", (rows,), func)
    check_vector(v, "v", (w.size // rows,), func)
    n_iter = check_positive_int(n_power_iterations, "n_power_iterations", func)
    eps = check_eps(eps, func)
    if eps == 0.0:
        raise ValueError(f"{func}: eps must be > 0, got 0.0")
    matrix = _as_matrix(w, ax)
    if training:
        for _ in range(n_iter):
            v[...] = _unit_vector(matrix.T @ np.asarray(u, np.float64), eps)
            u[...] = _unit_vector(matrix @ np.asarray(v, np.float64), eps)
    u64 = np.array(u, np.float64)
    v64 = np.array(v, np.float64)
    sigma = float(u64 @ (matrix @ v64))
    y = (np.asarray(w, np.float64) / sigma).astype(w.dtype)
    if not return_saved:
        return y
    return y, SpectralSaved(w.shape, w.dtype, ax, sigma, u64, v64)


def spectral_norm_backward(dy, w, saved):
    """Backward of :func:`spectral_norm`: ``dw``.

    ``u`` and ``v`` are constants (as in the paper and in PyTorch), so with
    ``sigma = u^T W v`` and ``W_sn = W / sigma``::

        dW = (dY - <dY, W_sn> u v^T) / sigma
    """
    func = "spectral_norm_backward"
    if not isinstance(saved, SpectralSaved):
        raise TypeError(f"{func}: saved must be the record returned by "
                        f"spectral_norm with return_saved=True, got "
                        f"{type(saved).__name__}")
    check_input(w, "w", func)
    check_input(dy, "dy", func)
    for name, value in (("w", w), ("dy", dy)):
        if value.shape != saved.shape:
            raise ValueError(f"{func}: {name} must have shape {saved.shape}, "
                             f"got {value.shape}")
    dmatrix = _as_matrix(dy, saved.axis)
    w_sn = _as_matrix(w, saved.axis) / saved.sigma
    dmatrix = (dmatrix - np.vdot(dmatrix, w_sn) * np.outer(saved.u, saved.v)) / saved.sigma
    shape, ax = saved.shape, saved.axis
    moved = (shape[ax],) + shape[:ax] + shape[ax + 1:]
    return np.moveaxis(dmatrix.reshape(moved), 0, ax).astype(saved.dtype)


class SpectralNorm(Reparametrization):
    """Spectral Normalization of a weight of ``weight_shape``; see
    :func:`spectral_norm`.

    The state is the power iteration's unit vectors ``u`` and ``v``
    (float64, drawn at random from ``seed``), updated in place by every
    training forward and left alone in inference.  The first training
    forwards converge them (``torch.nn.utils.parametrizations.spectral_norm``
    runs 15 iterations at wrap time instead; call the layer a few times in
    training for the same effect).
    """

    state_names = ("u", "v")

    def __init__(self, weight_shape, axis=0, n_power_iterations=1, eps=1e-12,
                 seed=0):
        super().__init__()
        try:
            self.weight_shape = tuple(check_positive_int(d, "weight_shape",
                                                         "SpectralNorm")
                                      for d in weight_shape)
        except TypeError:
            raise TypeError(f"SpectralNorm: weight_shape must be a tuple of "
                            f"ints, got {weight_shape!r}") from None
        self.axis = check_axis(axis, len(self.weight_shape), "SpectralNorm")
        self.n_power_iterations = check_positive_int(
            n_power_iterations, "n_power_iterations", "SpectralNorm")
        self.eps = check_eps(eps, "SpectralNorm")
        rows = self.weight_shape[self.axis]
        rng = np.random.default_rng(seed)
        self.u = _unit_vector(rng.standard_normal(rows), self.eps)
        self.v = _unit_vector(rng.standard_normal(math.prod(self.weight_shape)
                                                  // rows), self.eps)

    def _forward(self, w):
        check_input(w, "w", "SpectralNorm")
        if w.shape != self.weight_shape:
            raise ValueError(f"SpectralNorm: expected a weight of shape "
                             f"{self.weight_shape}, got {w.shape}")
        return spectral_norm(w, self.u, self.v, self.n_power_iterations,
                             self.eps, self.training, self.axis,
                             return_saved=True)

    def _backward(self, dy, w, saved):
        return spectral_norm_backward(dy, w, saved), {}

    def extra_repr(self):
        return (f"{self.weight_shape}, axis={self.axis}, "
                f"n_power_iterations={self.n_power_iterations}, eps={self.eps}")
