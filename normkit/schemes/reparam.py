"""Schemes that reparametrize a weight: Weight and Spectral Normalization.

Their input is the raw weight and their output the weight the model uses,
``w = layer(v)``; their backward maps the gradient with respect to ``w`` to
the one with respect to the raw weight.

- **Weight Normalization** ``w = g * v / ||v||`` is RMS normalization of
  the weight over each output unit with gain ``g / sqrt(n)`` and ``eps = 0``
  (``||v|| = sqrt(n * mean(v**2))``), so its forward and backward are the
  engine's.
- **Spectral Normalization** ``w / sigma(w)`` takes its power iteration's
  vector norms from the engine's moments (host arrays only).
"""

import dataclasses
import math

import numpy as np

from .. import engine
from ..backend.protocol import product
from ..checks import (check_axis, check_eps, check_input, check_ndim,
                      check_positive_int)
from ..view import View, channel_view
from .base import Normalizer, cast, normalize, normalize_backward

__all__ = ["Reparametrization", "WeightNorm", "SpectralNorm", "SpectralSaved",
           "unit_view"]


class Reparametrization(Normalizer):
    """Base of layers that reparametrize a weight array.

    The input of the layer is the raw weight, its output the weight the
    model uses, ``w = layer(v)``; ``layer.backward(dw)`` returns the
    gradient with respect to the raw weight and fills ``layer.grads`` with
    those of the layer's own parameters.  They are not activation
    normalizers: ``normkit compare`` and the benchmarks of activations
    skip them.

    Examples
    --------
    >>> import normkit
    >>> isinstance(normkit.WeightNorm(3), normkit.Reparametrization)
    True
    """

    def __init__(self):
        super().__init__(None, eps=0.0)


def _inverse_sqrt(n):
    """``1 / sqrt(n)`` for a count ``n``; 0 for units of no values (there
    is nothing to scale, and their ``dg``, a sum over no values, is 0)."""
    return 1.0 / math.sqrt(n) if n else 0.0


def unit_view(v, axis, func):
    """Validated ``axis`` of weight ``v`` (at least 1-D) and the view with
    one group per unit along it."""
    check_input(v, "v", func)
    check_ndim(v, func, min_ndim=1, name="v")
    ax = check_axis(axis, v.ndim, func)
    return ax, channel_view(v.shape, ax, per_sample=False)


class WeightNorm(Reparametrization):
    """Weight Normalization (Salimans and Kingma 2016), ``w = g * v /
    ||v||``; see :func:`normkit.weight_norm`.

    ``g`` (``num_units`` magnitudes, one per unit along ``axis``) is the
    layer's parameter; the input is ``v``.  ``g`` starts at ones; call
    :meth:`initialize` with the initial weight to start from ``w = v``,
    as ``torch.nn.utils.weight_norm`` does.

    Parameters
    ----------
    num_units : int
        Units along ``axis`` (rows of a dense weight, filters of a conv).
    axis : int, default 0

    See Also
    --------
    weight_norm : the functional form.
    SpectralNorm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> v = np.random.default_rng(0).standard_normal((3, 5))
    >>> layer = normkit.WeightNorm(3).initialize(v)
    >>> bool(np.allclose(layer(v), v))
    True
    """

    state_names = ("g",)

    def __init__(self, num_units, axis=0):
        super().__init__()
        self.g = np.ones(check_positive_int(num_units, "num_units",
                                            "WeightNorm"))
        self.axis = axis

    def _checked_view(self, v, func):
        """The unit view of ``v``; raises unless it has ``g.size`` units."""
        ax, view = unit_view(v, self.axis, func)
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

    def _forward(self, v, out=None):
        view = self._checked_view(v, self.label)
        gain = product(self.g, _inverse_sqrt(view.group_size))
        return normalize(v, view, gain, None, 0.0, return_saved=True,
                         variant=self.label, centered=False, out=out)

    @staticmethod
    def gradients(dw, v, saved, variant=None, dx_out=None):
        """``(dv, dg)``: with ``vhat = v / ||v||`` per unit, ``dg =
        sum(dw * vhat)`` and ``dv = g / ||v|| * (dw - vhat * sum(dw *
        vhat))``, the engine's uncentered backward with gain ``g /
        sqrt(n)`` (``dv`` written into ``dx_out`` when given)."""
        dv, dgain, _ = normalize_backward(dw, v, saved, variant,
                                          dx_out=dx_out)
        return dv, product(dgain, _inverse_sqrt(saved.view.group_size))

    def _backward(self, dw, v, saved, dx_out=None):
        dv, dg = self.gradients(dw, v, saved, dx_out=dx_out)
        return dv, {"g": cast(dg, self.g.shape, self.g.dtype)}

    def extra_repr(self):
        return f"{self.g.size}, axis={self.axis}"


@dataclasses.dataclass(frozen=True)
class SpectralSaved:
    """What Spectral Normalization's forward hands its backward:
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
    cols = math.prod(w.shape[:axis] + w.shape[axis + 1:])
    return np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(
        w.shape[axis], cols)


def _unit_vector(vector, eps):
    """``vector / max(||vector||, eps)``, the norm from the engine's moments."""
    _, mean_square = engine.moments(vector, View(1, 1, 1, vector.size, 1),
                                    centered=False)
    return vector / max(math.sqrt(vector.size * mean_square[0, 0]), eps)


class SpectralNorm(Reparametrization):
    """Spectral Normalization (Miyato et al. 2018) of a weight of
    ``weight_shape``, ``w / sigma(w)``; see :func:`normkit.spectral_norm`.

    The state is the power iteration's unit vectors ``u`` and ``v``
    (float64, drawn at random from ``seed``), updated in place by every
    training forward and left alone in inference.  The first training
    forwards converge them (``torch.nn.utils.parametrizations.spectral_norm``
    runs 15 iterations at wrap time instead; call the layer a few times in
    training for the same effect).  Host arrays only.

    Parameters
    ----------
    weight_shape : tuple of int
    axis : int, default 0
        The axis of the matrix's rows.
    n_power_iterations : int, default 1
        Power-method steps per training forward.
    eps : float > 0, default 1e-12
    seed : int, default 0
        Seed of the random initial ``u`` and ``v``.

    See Also
    --------
    spectral_norm : the functional form.
    WeightNorm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> w = np.diag([3.0, 1.0])
    >>> layer = normkit.SpectralNorm((2, 2))
    >>> for _ in range(20):
    ...     y = layer(w)
    >>> y.round(3).tolist()
    [[1.0, 0.0], [0.0, 0.333]]
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
        if w.shape != self.weight_shape:
            raise ValueError(f"{self.label}: expected a weight of shape "
                             f"{self.weight_shape}, got {w.shape}")
        matrix = _as_matrix(w, self.axis)
        u, v = self.u, self.v
        if self.training:
            for _ in range(self.n_power_iterations):
                v[...] = _unit_vector(matrix.T @ np.asarray(u, np.float64),
                                      self.eps)
                u[...] = _unit_vector(matrix @ np.asarray(v, np.float64),
                                      self.eps)
        u64 = np.array(u, np.float64)
        v64 = np.array(v, np.float64)
        sigma = float(u64 @ (matrix @ v64))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = (np.asarray(w, np.float64) / sigma).astype(w.dtype)  # IEEE
        return y, SpectralSaved(w.shape, w.dtype, self.axis, sigma, u64, v64)

    @staticmethod
    def gradients(dy, w, saved):
        """``dW = (dY - <dY, W_sn> u v^T) / sigma``: ``u`` and ``v`` are
        constants (as in the paper and in PyTorch), ``sigma = u^T W v`` and
        ``W_sn = W / sigma``."""
        dmatrix = _as_matrix(dy, saved.axis)
        shape, ax = saved.shape, saved.axis
        moved = (shape[ax],) + shape[:ax] + shape[ax + 1:]
        # sigma 0 gives NaN, values beyond float16's range inf: no warnings
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            w_sn = _as_matrix(w, saved.axis) / saved.sigma
            dmatrix = (dmatrix - np.vdot(dmatrix, w_sn)
                       * np.outer(saved.u, saved.v)) / saved.sigma
            return np.moveaxis(dmatrix.reshape(moved), 0, ax).astype(saved.dtype)

    def _backward(self, dy, w, saved):
        return self.gradients(dy, w, saved), {}

    def extra_repr(self):
        return (f"{self.weight_shape}, axis={self.axis}, "
                f"n_power_iterations={self.n_power_iterations}, eps={self.eps}")
