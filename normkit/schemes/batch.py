"""Schemes with statistics over the batch: BatchNorm, Batch
Renormalization and Ghost BatchNorm.

Each is a view (:func:`~normkit.view.channel_view` over the batch, or
:func:`~normkit.view.ghost_view`) plus what it does with the statistics,
written with the public extension API only (:mod:`normkit.schemes.base`,
:mod:`normkit.engine`, :class:`~normkit.backend.protocol.channelwise`).
"""

import math

from .. import engine
from ..backend.protocol import channelwise, product, reciprocal
from ..checks import (check_batch_eps, check_channels, check_positive_int,
                      is_real, values_per_channel_error)
from ..view import channel_view, ghost_view
from .base import (RunningStatsNormalizer, Saved, affine_gradients,
                   normalize_with_statistics)

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchRenorm", "GhostBatchNorm"]


class BatchNorm(RunningStatsNormalizer):
    """Batch normalization (Ioffe and Szegedy 2015) over channel ``axis``;
    see :func:`normkit.batch_norm` for the formulas.

    .. math::

        y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}
            \\gamma + \\beta

    per channel, over the batch and every other axis.  Training normalizes
    with the batch mean and biased variance and updates
    ``running_mean`` and ``running_var`` (with the unbiased variance
    ``m / (m - 1) * Var``, ``m`` values per channel)::

        running = (1 - momentum) * running + momentum * batch

    inference uses the running statistics (the batch's when
    ``track_running_stats`` is false).

    Parameters
    ----------
    num_features : int
        Channels ``C``, the size of ``axis``.
    eps : float, default 1e-5
        Added to the variance.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running averages; None: cumulative
        average.
    affine : bool, default True
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    axis : int, default 1
        Channel axis: 1 channels-first, -1 channels-last.
    bias : bool, default True
        Keyword only, as in PyTorch 2.13: with ``affine``, whether there is
        a ``bias`` besides the ``weight``.

    Notes
    -----
    Shape: Input ``(N, C, *)`` (``axis=1``) or ``(N, *, C)`` (``axis=-1``),
    output the same.

    As in PyTorch 2.13, wherever the batch statistics are used, ``eps``
    must be positive and a batch of one value per channel raises; an empty
    batch gives an empty output and leaves the running statistics alone
    (it is still counted in ``num_batches_tracked``).

    See Also
    --------
    batch_norm : the functional form.
    BatchNorm2d

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> bn = normkit.BatchNorm2d(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4, 4))
    >>> y = bn(x)
    >>> bool(np.allclose(y.mean(axis=(0, 2, 3)), 0.0)), bn.num_batches_tracked
    (True, 1)
    """

    #: Allowed input dimensions (None: any with at least 2).
    allowed_ndim = None

    def view(self, shape):
        """Statistics per channel over every other axis."""
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            allowed_ndim=self.allowed_ndim)
        return channel_view(shape, ax, per_sample=False)

    def _forward(self, x, out=None):
        view = self.view(x.shape)
        if not self.training and self.running_mean is not None:
            return self.normalize_running(x, view, out)
        check_batch_eps(self.eps, self.label)
        if view.group_size == 1:
            raise values_per_channel_error(x)
        return self.normalize_tracked(x, view, out)


def _for_input(shape, torch_name, axes, example):
    """Class decorator: the docstring of a :class:`BatchNorm` for one input
    rank (``shape``, as ``torch_name``, statistics over ``axes``) with a
    doctest ``example``."""
    def document(cls):
        cls.__doc__ = f""":class:`BatchNorm` for {shape} input, as
    ``{torch_name}``:

    .. math::

        y = \\frac{{x - \\mathrm{{E}}[x]}}{{\\sqrt{{\\mathrm{{Var}}[x] + \\epsilon}}}}
            \\gamma + \\beta

    per channel over {axes}, with running statistics as :class:`BatchNorm`.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps, momentum, affine, track_running_stats, axis, bias
        As :class:`BatchNorm` (defaults ``1e-5``, ``0.1``, ``True``,
        ``True``, ``1``, ``True``; ``bias`` keyword only).

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
{example}
    """
        return cls
    return document


@_for_input("``(N, C)`` or ``(N, C, L)``", "torch.nn.BatchNorm1d",
            "``N`` (and ``L``)", """\
    >>> normkit.BatchNorm1d(4)(np.ones((8, 4, 10))).shape
    (8, 4, 10)""")
class BatchNorm1d(BatchNorm):
    allowed_ndim = (2, 3)


@_for_input("``(N, C, H, W)``", "torch.nn.BatchNorm2d",
            "``(N, H, W)`` (``axis=-1``: input ``(N, H, W, C)``)", """\
    >>> bn = normkit.BatchNorm2d(3, axis=-1)              # channels last
    >>> x = np.random.default_rng(0).normal(2.0, 1.0, (4, 5, 5, 3))
    >>> bool(np.allclose(bn(x).mean(axis=(0, 1, 2)), 0.0))
    True""")
class BatchNorm2d(BatchNorm):
    allowed_ndim = (4,)


@_for_input("``(N, C, D, H, W)``", "torch.nn.BatchNorm3d", "``(N, D, H, W)``",
            """\
    >>> normkit.BatchNorm3d(2)(np.ones((2, 2, 3, 3, 3))).shape
    (2, 2, 3, 3, 3)""")
class BatchNorm3d(BatchNorm):
    allowed_ndim = (5,)


# --------------------------------------------------------------------------
# Batch Renormalization
# --------------------------------------------------------------------------

@channelwise(outputs=5)
def renormalization(mean, var, running_mean, running_std, eps, rmax, dmax):
    """Batch Renormalization's coefficients from a channel's batch
    statistics (Ioffe 2017, Algorithm 1): ``sigma = sqrt(var + eps)``,
    ``r = clip(sigma / running_std, 1/rmax, rmax)``, ``d = clip((mean -
    running_mean) / running_std, -dmax, dmax)``, and the center and factor
    with which ``(x - center) * factor = (x - mean) / sigma * r + d``.

    Returns ``(mean - d * sigma / r, r / sigma, sigma, r, d)``.
    """
    sigma = math.sqrt(var + eps)
    r = min(max(sigma / running_std, 1.0 / rmax), rmax)
    d = min(max((mean - running_mean) / running_std, -dmax), dmax)
    return mean - d * sigma / r, r / sigma, sigma, r, d


@channelwise
def renorm_weight_sum(sum_dy_xhat, r, sum_dy, d):
    """``sum(dy * (xhat * r + d)) = sum_dy_xhat * r + sum_dy * d``."""
    return sum_dy_xhat * r + sum_dy * d


class BatchRenorm(RunningStatsNormalizer):
    """Batch Renormalization (Ioffe 2017); see :func:`normkit.batch_renorm`.

    The BatchNorm view; in training the output is corrected towards the
    running statistics by ``r`` and ``d`` (per-channel arithmetic, constants
    of the backward), and ``running_std`` (not a variance) is updated with
    ``sigma_B``.  ``rmax`` and ``dmax`` are plain attributes that may change
    between steps, e.g. ``layer.rmax, layer.dmax =
    normkit.batch_renorm_schedule(step)``.  Unlike :class:`BatchNorm`,
    ``eps = 0`` is accepted in training (a channel of zero variance then
    gives NaN); an empty batch is counted and leaves the running
    statistics alone.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in ``running_mean`` and ``running_std``.
    rmax : float >= 1, default 3.0
    dmax : float >= 0, default 5.0
        Clips of ``r`` and ``d``; ``rmax=1, dmax=0`` is BatchNorm.
    affine : bool, default True
    axis : int, default 1
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``.

    Notes
    -----
    Shape: As :class:`BatchNorm`.

    See Also
    --------
    batch_renorm : the functional form.
    batch_renorm_schedule

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.BatchRenorm(4, rmax=1.0, dmax=0.0)   # plain BN
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4))
    >>> bool(np.allclose(layer(x), normkit.batch_norm(x, training=True)))
    True
    """

    state_names = ("weight", "bias", "running_mean", "running_std",
                   "num_batches_tracked")
    spread_name = "running_std"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, rmax=3.0,
                 dmax=5.0, affine=True, axis=1, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, True, axis,
                         bias=bias)
        self.rmax = rmax
        self.dmax = dmax

    def view(self, shape):
        """BatchNorm's view: statistics per channel over every other axis."""
        ax = check_channels(self.label, shape, self.axis, self.num_features)
        return channel_view(shape, ax, per_sample=False)

    def check_limits(self):
        """Raise ValueError unless ``rmax >= 1`` and ``dmax >= 0`` are finite."""
        for name, low in (("rmax", 1.0), ("dmax", 0.0)):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value < low:
                raise ValueError(f"{self.label}: {name} must be a finite "
                                 f"number >= {low}, got {value!r}")

    def _forward(self, x, out=None):
        view = self.view(x.shape)
        self.check_limits()
        if not self.training:
            return normalize_with_statistics(
                x, view, self.running_mean, reciprocal(self.running_std),
                self.weight, self.bias, variant=self.label, out=out)
        if view.group_size == 1:
            raise values_per_channel_error(x)
        y, mean, var, (_, _, sigma, r, d) = engine.normalize_transformed(
            x, view, renormalization,
            (self.running_mean, self.running_std, float(self.eps),
             float(self.rmax), float(self.dmax)),
            self.weight, self.bias, out=out)
        rstd = reciprocal(sigma)
        r, d = r.reshape(-1), d.reshape(-1)
        if view.group_size:
            self.update_running_stats(mean, sigma.reshape(1, view.K), None)
        else:  # an empty batch: counted, the statistics left alone
            self.update_running_stats(None, None, 0)
        return y, Saved(self.label, view, x.shape, mean,
                        rstd.reshape(1, view.K), True, self.weight,
                        self.bias is not None, r, d, var=var,
                        gradients=self.gradients)

    @staticmethod
    def gradients(dy, x, saved, dx_out=None):
        """Training backward: ``g = weight * r * dy`` in
        :func:`~normkit.normalize_backward`'s formula and ``dweight =
        sum(dy * (xhat * r + d))``; ``dx`` written into ``dx_out`` when
        given."""
        weight = saved.weight
        gscale = saved.r if weight is None else product(weight, saved.r)
        if not saved.view.group_size:  # no values: r, d are NaN, sums 0
            return affine_gradients(dy, x, saved, gscale, dx_out=dx_out)
        return affine_gradients(dy, x, saved, gscale,
                                lambda sum_dy, sum_dy_xhat: renorm_weight_sum(
                                    sum_dy_xhat, saved.r, sum_dy, saved.d),
                                dx_out=dx_out)

    def extra_repr(self):
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}"


# --------------------------------------------------------------------------
# Ghost BatchNorm
# --------------------------------------------------------------------------

class GhostBatchNorm(RunningStatsNormalizer):
    """Ghost Batch Normalization (Hoffer, Hubara and Soudry 2017); see
    :func:`normkit.ghost_batch_norm`.

    Training normalizes each virtual batch of ``virtual_batch_size``
    samples with its own statistics (:func:`~normkit.view.ghost_view`; the
    batch size must be a multiple of it) and updates the running
    statistics once per call with the ghost statistics averaged; inference
    is BatchNorm inference with them, for any batch size.  ``eps`` and
    empty batches as in :class:`BatchNorm`.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    virtual_batch_size : int
        Samples per ghost batch; must divide the batch in training.
    eps, momentum, affine, track_running_stats, axis, bias
        As :class:`BatchNorm` (``axis`` may not be 0).

    See Also
    --------
    ghost_batch_norm : the functional form.
    BatchNorm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.GhostBatchNorm(3, virtual_batch_size=4)
    >>> y = layer(np.random.default_rng(0).standard_normal((8, 3, 5)))
    >>> bool(np.allclose(y[:4].mean(axis=(0, 2)), 0.0))   # per ghost batch
    True
    """

    def __init__(self, num_features, virtual_batch_size, eps=1e-5,
                 momentum=0.1, affine=True, track_running_stats=True, axis=1,
                 *, bias=True):
        self.virtual_batch_size = check_positive_int(
            virtual_batch_size, "virtual_batch_size", "GhostBatchNorm")
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis, bias=bias)

    def view(self, shape):
        """The ghost-batch view (:func:`~normkit.view.ghost_view`)."""
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            min_axis=1)
        return ghost_view(shape, ax, self.virtual_batch_size)

    def _forward(self, x, out=None):
        if not self.training and self.running_mean is not None:
            ax = check_channels(self.label, x.shape, self.axis,
                                self.num_features, min_axis=1)
            return self.normalize_running(
                x, channel_view(x.shape, ax, per_sample=False), out)
        view = self.view(x.shape)
        check_batch_eps(self.eps, self.label)
        if view.P and view.group_size == 1:
            raise ValueError(f"{self.label}: expected more than 1 value per "
                             f"channel in each virtual batch, got "
                             f"{view.group_size} (input size {tuple(x.shape)}, "
                             f"virtual_batch_size={self.virtual_batch_size})")
        return self.normalize_tracked(x, view, out)

    def extra_repr(self):
        return (f"{super().extra_repr()}, "
                f"virtual_batch_size={self.virtual_batch_size}")
