"""Schemes with statistics per sample: InstanceNorm, GroupNorm, LayerNorm
and RMSNorm.

GroupNorm and InstanceNorm are :func:`~normkit.view.channel_view` with one
statistics group per sample and channel group; LayerNorm and RMSNorm are
:func:`~normkit.view.trailing_view`, RMSNorm with the statistics taken
about zero.  Written with the public extension API only.
"""

import numpy as np

from ..checks import (check_channels, check_count, check_eps, check_ndim,
                      check_normalized_shape, check_positive_int,
                      check_trailing)
from ..view import channel_view, trailing_view
from .base import Normalizer, RunningStatsNormalizer, normalize

__all__ = ["InstanceNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm"]


class InstanceNorm(RunningStatsNormalizer):
    """Instance normalization (Ulyanov et al. 2016); see
    :func:`normkit.instance_norm`.

    Each sample's channels are normalized over the other (spatial) axes.
    Input statistics in training; in inference too unless
    ``track_running_stats`` is true.  Defaults as PyTorch's
    ``InstanceNorm*d``: ``affine=False``, ``track_running_stats=False``.

    This class takes any number of dimensions, so axis 0 is always the
    batch: for unbatched input, ``(C, L)``, ``(C, H, W)`` or ``(C, D, H,
    W)`` as PyTorch accepts it, use :class:`InstanceNorm1d`,
    :class:`InstanceNorm2d` or :class:`InstanceNorm3d`, which know their
    dimensions, or pass ``x[None]``.  ``num_features`` is always checked
    against the channel axis (ValueError; PyTorch only warns without
    affine parameters).  Running statistics are updated with ``momentum``
    and counted in ``num_batches_tracked`` as :class:`BatchNorm`'s
    (``momentum=None``: the cumulative average), where PyTorch's
    ``InstanceNorm*d`` never count and treat ``momentum=None`` as 0.

    .. math::

        y_{ncs} = \\frac{x_{ncs} - \\mu_{nc}}{\\sqrt{\\sigma^2_{nc} + \\epsilon}}
                  \\gamma_c + \\beta_c

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
    affine : bool, default False
    track_running_stats : bool, default False
    axis : int, default 1
        Channel axis, 1 or a later one (axis 0 holds the samples).
    bias : bool, default True
        Keyword only, as in PyTorch 2.13: with ``affine``, whether there is
        a ``bias`` besides the ``weight``.

    Notes
    -----
    Shape: ``(N, C, L...)``, or ``(N, L..., C)`` with ``axis=-1``; the
    output has the input's shape and dtype.

    See Also
    --------
    instance_norm : the functional form.
    InstanceNorm2d

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.InstanceNorm(3)
    >>> y = layer(np.random.default_rng(0).normal(2.0, 3.0, (2, 3, 8)))
    >>> bool(np.allclose(y.mean(axis=2), 0.0))
    True
    """

    #: Input dimensions accepted (None: any, at least 2, axis 0 the batch).
    allowed_ndim = None

    #: Dimensions of an unbatched input, normalized as a batch of one
    #: (None: every input has a batch axis).
    unbatched_ndim = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, axis=1, *, bias=True):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis, bias=bias)

    def view(self, shape):
        """One group per sample and channel."""
        hint = ("" if self.unbatched_ndim is not None else
                " (axis 0 is the batch: for unbatched input use "
                "InstanceNorm1d/2d/3d, or pass x[None])")
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            min_axis=1, hint=hint)
        return channel_view(shape, ax, per_sample=True)

    def _forward(self, x, out=None):
        if self.allowed_ndim is not None:
            check_ndim(x, self.label, allowed=self.allowed_ndim)
        if x.ndim == self.unbatched_ndim:  # a batch of one, axis as batched
            batched = (1,) + tuple(x.shape)
            y, saved = self._forward(x.reshape(batched),
                                     _batch_of_one(out, batched))
            return y.reshape(x.shape), saved.replace(shape=tuple(x.shape))
        view = self.view(x.shape)
        if not self.training and self.running_mean is not None:
            return self.normalize_running(x, view, out)
        if view.group_size == 1:
            raise ValueError("Expected more than 1 spatial element when "
                             f"training, got input size {tuple(x.shape)}")
        return self.normalize_tracked(x, view, out)


def _batch_of_one(out, batched):
    """``out`` viewed as a batch of one (None when a device array cannot be
    viewed so: the result is then copied into ``out``)."""
    if out is None or isinstance(out, np.ndarray):
        return None if out is None else out[None]
    return out.reshape(batched) if out.is_c_contiguous() else None


class InstanceNorm1d(InstanceNorm):
    """:class:`InstanceNorm` for ``(N, C, L)`` input, or unbatched ``(C, L)``
    (normalized as a batch of one), as ``torch.nn.InstanceNorm1d``.

    ``axis`` counts the dimensions of the batched layout: with ``axis=-1``
    the inputs are ``(N, L, C)`` and ``(L, C)``.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps, momentum, affine, track_running_stats, axis, bias
        As :class:`InstanceNorm`.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (3, 8))   # (C, L)
    >>> y = normkit.InstanceNorm1d(3)(x)
    >>> y.shape, bool(np.allclose(y.mean(axis=1), 0.0))
    ((3, 8), True)
    """

    allowed_ndim = (2, 3)
    unbatched_ndim = 2


class InstanceNorm2d(InstanceNorm):
    """:class:`InstanceNorm` for ``(N, C, H, W)`` input, or unbatched
    ``(C, H, W)``, as ``torch.nn.InstanceNorm2d`` (``axis`` as in
    :class:`InstanceNorm1d`).

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps, momentum, affine, track_running_stats, axis, bias
        As :class:`InstanceNorm`.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (3, 4, 5))   # (C, H, W)
    >>> y = normkit.InstanceNorm2d(3)(x)
    >>> bool(np.allclose(y, normkit.instance_norm(x[None])[0]))
    True
    """

    allowed_ndim = (3, 4)
    unbatched_ndim = 3


class InstanceNorm3d(InstanceNorm):
    """:class:`InstanceNorm` for ``(N, C, D, H, W)`` input, or unbatched
    ``(C, D, H, W)``, as ``torch.nn.InstanceNorm3d`` (``axis`` as in
    :class:`InstanceNorm1d`).

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps, momentum, affine, track_running_stats, axis, bias
        As :class:`InstanceNorm`.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 2, 4, 4))
    >>> y = normkit.InstanceNorm3d(3, affine=True)(x)
    >>> y.shape
    (2, 3, 2, 4, 4)
    """

    allowed_ndim = (4, 5)
    unbatched_ndim = 4


class GroupNorm(Normalizer):
    """Group normalization (Wu and He 2018); see :func:`normkit.group_norm`.

    Each sample's ``num_channels`` channels are split into ``num_groups``
    groups, each normalized over its channels and the other axes, then a
    per-channel affine.

    Parameters
    ----------
    num_groups : int
        Groups ``G``; must divide ``num_channels``.
    num_channels : int
        Channels ``C`` (0 allowed, as in PyTorch).
    eps : float, default 1e-5
    affine : bool, default True
        Per-channel ``weight`` (ones) and ``bias`` (zeros).
    axis : int, default 1
        Channel axis (not 0, the batch axis).
    bias : bool, default True
        Keyword only, as in PyTorch 2.13: with ``affine``, whether there is
        a ``bias`` besides the ``weight``.

    Notes
    -----
    Shape: Input ``(N, C, *)`` (``axis=1``) or ``(N, *, C)``, output the same.

    See Also
    --------
    group_norm : the functional form.
    LayerNorm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.GroupNorm(num_groups=4, num_channels=16)
    >>> x = np.random.default_rng(0).standard_normal((2, 16, 8, 8))
    >>> y = layer(x)
    >>> dx = layer.backward(np.ones_like(y))
    >>> dx.shape, layer.grads["weight"].shape
    ((2, 16, 8, 8), (16,))
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, axis=1,
                 *, bias=True):
        self.num_groups = check_positive_int(num_groups, "num_groups", "GroupNorm")
        self.num_channels = check_count(num_channels, "num_channels",
                                        "GroupNorm")
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups must divide num_channels "
                             f"{num_channels}, got num_groups={num_groups}")
        super().__init__((self.num_channels,) if affine else None, eps,
                         bias=bias)
        self.axis = axis

    def view(self, shape):
        """One group per sample and group of ``C / num_groups`` channels."""
        ax = check_channels(self.label, shape, self.axis, self.num_channels,
                            min_axis=1, feature_name="num_channels")
        return channel_view(shape, ax, per_sample=True, groups=self.num_groups)

    def extra_repr(self):
        no_bias = ", bias=False" if self.weight is not None and self.bias is None else ""
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
                f"{no_bias}, axis={self.axis}")


class LayerNorm(Normalizer):
    """Layer normalization (Ba, Kiros and Hinton 2016) over the trailing
    ``normalized_shape`` axes; see :func:`normkit.layer_norm`.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing shape normalized over (sizes may be 0, as in PyTorch).
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        ``weight`` (ones) and ``bias`` (zeros) of shape ``normalized_shape``.
    bias : bool, default True
        As ``torch.nn.LayerNorm``'s: with ``elementwise_affine``, whether
        there is a ``bias`` besides the ``weight``.

    Notes
    -----
    Shape: Input ``(*, *normalized_shape)``, output the same.

    See Also
    --------
    layer_norm : the functional form.
    RMSNorm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.LayerNorm(5)
    >>> y = layer(np.random.default_rng(0).normal(1.0, 2.0, (3, 5)))
    >>> bool(np.allclose(y.std(axis=1), 1.0, atol=1e-4))
    True
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True,
                 bias=True):
        self.normalized_shape = check_normalized_shape(normalized_shape,
                                                       type(self).__name__)
        super().__init__(self.normalized_shape if elementwise_affine else None,
                         eps, bias=bias)

    def view(self, shape):
        """One group per leading index, over ``normalized_shape``."""
        check_trailing(self.label, shape, self.normalized_shape)
        return trailing_view(shape, len(self.normalized_shape))

    def extra_repr(self):
        no_bias = ", bias=False" if self.weight is not None and self.bias is None else ""
        return f"{self.normalized_shape}, eps={self.eps}{no_bias}"


class RMSNorm(LayerNorm):
    """Root mean square layer normalization (Zhang and Sennrich 2019) over
    the trailing ``normalized_shape`` axes; see :func:`normkit.rms_norm`.

    LayerNorm's view with the statistics taken about zero
    (``centered = False``).  Arguments as ``torch.nn.RMSNorm``:
    ``elementwise_affine`` gives a gain ``weight`` of shape
    ``normalized_shape`` (ones) and no bias; ``eps=None`` is the machine
    epsilon of the input's dtype.

    .. math::

        y = \\frac{x}{\\sqrt{\\overline{x^2} + \\epsilon}} \\gamma

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float or None, default None
    elementwise_affine : bool, default True

    See Also
    --------
    rms_norm : the functional form.
    LayerNorm

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> y = normkit.RMSNorm(4)(np.array([[3.0, -3.0, 3.0, -3.0]]))
    >>> y.round(4).tolist()
    [[1.0, -1.0, 1.0, -1.0]]
    """

    centered = False

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True):
        self.normalized_shape = check_normalized_shape(normalized_shape,
                                                       "RMSNorm")
        Normalizer.__init__(self, self.normalized_shape if elementwise_affine
                            else None, bias=False)
        self.eps = None if eps is None else check_eps(eps, "RMSNorm")

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"

    def _forward(self, x, out=None):
        view = self.view(x.shape)
        eps = float(np.finfo(x.dtype).eps) if self.eps is None else self.eps
        return normalize(x, view, self.weight, None, eps, return_saved=True,
                         variant=self.label, centered=False, out=out)
