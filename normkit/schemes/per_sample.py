"""Schemes with statistics per sample: InstanceNorm, GroupNorm, LayerNorm
and RMSNorm.

GroupNorm and InstanceNorm are :func:`~normkit.view.channel_view` with one
statistics group per sample and channel group; LayerNorm and RMSNorm are
:func:`~normkit.view.trailing_view`, RMSNorm with the statistics taken
about zero.  Written with the public extension API only.
"""

import numpy as np

from ..checks import (check_channels, check_eps, check_normalized_shape,
                      check_positive_int, check_trailing)
from ..view import channel_view, trailing_view
from .base import Normalizer, RunningStatsNormalizer, normalize

__all__ = ["InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm"]


class InstanceNorm(RunningStatsNormalizer):
    """Instance normalization (Ulyanov et al. 2016); see
    :func:`normkit.instance_norm`.

    Each sample's channels are normalized over the other (spatial) axes.
    Input statistics in training; in inference too unless
    ``track_running_stats`` is true.  Defaults as PyTorch's
    ``InstanceNorm*d``: ``affine=False``, ``track_running_stats=False``.

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

    Notes
    -----
    Shape: ``(N, C, L...)``, or ``(N, L..., C)`` with ``axis=-1``; the
    output has the input's shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.InstanceNorm(3)
    >>> y = layer(np.random.default_rng(0).normal(2.0, 3.0, (2, 3, 8)))
    >>> bool(np.allclose(y.mean(axis=2), 0.0))
    True
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, axis=1):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis)

    def view(self, shape):
        """One group per sample and channel."""
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            min_axis=1)
        return channel_view(shape, ax, per_sample=True)

    def _forward(self, x):
        view = self.view(x.shape)
        if not self.training and self.running_mean is not None:
            return self.normalize_running(x, view)
        if view.group_size <= 1:
            raise ValueError("Expected more than 1 spatial element when "
                             f"training, got input size {tuple(x.shape)}")
        return self.normalize_tracked(x, view)


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
        Channels ``C``.
    eps : float, default 1e-5
    affine : bool, default True
        Per-channel ``weight`` (ones) and ``bias`` (zeros).
    axis : int, default 1
        Channel axis (not 0, the batch axis).

    Notes
    -----
    Shape: Input ``(N, C, *)`` (``axis=1``) or ``(N, *, C)``, output the same.

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

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, axis=1):
        self.num_groups = check_positive_int(num_groups, "num_groups", "GroupNorm")
        self.num_channels = check_positive_int(num_channels, "num_channels",
                                               "GroupNorm")
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups must divide num_channels "
                             f"{num_channels}, got num_groups={num_groups}")
        super().__init__((self.num_channels,) if affine else None, eps)
        self.axis = axis

    def view(self, shape):
        """One group per sample and group of ``C / num_groups`` channels."""
        ax = check_channels(self.label, shape, self.axis, self.num_channels,
                            min_axis=1)
        return channel_view(shape, ax, per_sample=True, groups=self.num_groups)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"axis={self.axis}")


class LayerNorm(Normalizer):
    """Layer normalization (Ba, Kiros and Hinton 2016) over the trailing
    ``normalized_shape`` axes; see :func:`normkit.layer_norm`.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing shape normalized over.
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        ``weight`` (ones) and ``bias`` (zeros) of shape ``normalized_shape``.

    Notes
    -----
    Shape: Input ``(*, *normalized_shape)``, output the same.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> layer = normkit.LayerNorm(5)
    >>> y = layer(np.random.default_rng(0).normal(1.0, 2.0, (3, 5)))
    >>> bool(np.allclose(y.std(axis=1), 1.0, atol=1e-4))
    True
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        self.normalized_shape = check_normalized_shape(normalized_shape,
                                                       type(self).__name__)
        super().__init__(self.normalized_shape if elementwise_affine else None,
                         eps)

    def view(self, shape):
        """One group per leading index, over ``normalized_shape``."""
        check_trailing(self.label, shape, self.normalized_shape)
        return trailing_view(shape, len(self.normalized_shape))

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


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

    def _forward(self, x):
        view = self.view(x.shape)
        eps = float(np.finfo(x.dtype).eps) if self.eps is None else self.eps
        return normalize(x, view, self.weight, None, eps, return_saved=True,
                         variant=self.label, centered=False)
