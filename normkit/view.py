"""The canonical view every normalizer reduces over.

Every normalizer in the family computes statistics over some axes of its
input and normalizes with them.  For a C-contiguous array all of them are
free reshapes of one canonical five-dimensional view

.. code-block:: text

    x  ->  (P, A, K, J, B)
    statistics (mean, variance) per (P, K), reduced over (A, J, B)
    affine parameters (gamma, beta) per (K, J)   -- channel c = k * J + j

=============  ==============================  =============================
variant        channels-first (N, C, S...)     channels-last (N, S..., C)
=============  ==============================  =============================
BatchNorm      P=1, A=N, K=C, J=1, B=S         P=1, A=N*S, K=C, J=1, B=1
InstanceNorm   P=N, A=1, K=C, J=1, B=S         P=N, A=S, K=C, J=1, B=1
GroupNorm      P=N, A=1, K=G, J=C/G, B=S       P=N, A=S, K=G, J=C/G, B=1
LayerNorm      P=rows, A=1, K=1, J=D, B=1      same
Ghost BN (v)   P=N/v, A=v, K=C, J=1, B=S       P=N/v, A=v*S, K=C, J=1, B=1
=============  ==============================  =============================

A scheme is therefore a :class:`View` plus what it does with the statistics.
"""

from dataclasses import dataclass
import functools
import math

__all__ = ["View", "channel_view", "trailing_view", "ghost_view"]


@dataclass(frozen=True)
class View:
    """Canonical view ``(P, A, K, J, B)`` of an input of ``P*A*K*J*B`` values.

    Statistics are per ``(p, k)`` over ``A * J * B`` values; affine
    parameters are per ``(k, j)``, ``K * J`` of them.

    Parameters
    ----------
    P, A, K, J, B : int
        The five sizes (their product is the input's size).

    Examples
    --------
    GroupNorm with 4 groups of an ``(N, C, H, W) = (2, 8, 3, 3)`` input:
    2 x 4 groups of 2 * 9 values, 8 affine parameters.

    >>> from normkit import View
    >>> view = View(P=2, A=1, K=4, J=2, B=9)
    >>> view.group_size, view.K * view.J
    (18, 8)
    """

    P: int
    A: int
    K: int
    J: int
    B: int

    @property
    def group_size(self):
        """Values per statistics group, ``A * J * B``."""
        return self.A * self.J * self.B

    @functools.cached_property
    def dims(self):
        """``(P, A, K, J, B)`` as a tuple (formed once per view: the
        views of :func:`channel_view` and :func:`trailing_view` are
        cached, and every kernel call unpacks them)."""
        return self.P, self.A, self.K, self.J, self.B


@functools.lru_cache(maxsize=512)
def channel_view(shape, axis, per_sample, groups=None):
    """View for statistics per channel (or channel group) along ``axis``.

    Parameters
    ----------
    shape : tuple of int
        Input shape.
    axis : int
        Channel axis, already normalized to ``0 <= axis < len(shape)``.
    per_sample : bool
        Separate statistics for each index of axis 0 (instance and group
        normalization) instead of one set over the batch.
    groups : int, optional
        Channels are reduced in ``groups`` contiguous groups (GroupNorm);
        default one group per channel.

    Returns
    -------
    View

    Examples
    --------
    >>> from normkit.view import channel_view
    >>> channel_view((8, 64, 32, 32), 1, per_sample=False)      # BatchNorm
    View(P=1, A=8, K=64, J=1, B=1024)
    >>> channel_view((8, 32, 32, 64), 3, per_sample=True, groups=16)
    View(P=8, A=1024, K=16, J=4, B=1)
    """
    channels = shape[axis]
    groups = channels if groups is None else groups
    width = channels // groups if groups else 1   # no channels: no groups
    inner = math.prod(shape[axis + 1:])
    if per_sample:
        return View(shape[0], math.prod(shape[1:axis]), groups, width, inner)
    return View(1, math.prod(shape[:axis]), groups, width, inner)


@functools.lru_cache(maxsize=512)
def trailing_view(shape, n_trailing):
    """View for statistics over the last ``n_trailing`` axes (LayerNorm):
    one group per leading index, ``J`` the product of the trailing sizes.

    Examples
    --------
    >>> from normkit.view import trailing_view
    >>> trailing_view((4, 10, 16), 1)
    View(P=40, A=1, K=1, J=16, B=1)
    """
    return View(math.prod(shape[:len(shape) - n_trailing]), 1, 1,
                math.prod(shape[len(shape) - n_trailing:]), 1)


def ghost_view(shape, axis, virtual_batch_size):
    """BatchNorm's view of ``shape`` with one statistics group per channel
    and virtual batch: ``P = N / v`` blocks of ``v`` consecutive samples.

    Raises ValueError unless ``virtual_batch_size`` divides ``N``.

    Examples
    --------
    >>> from normkit.view import ghost_view
    >>> ghost_view((8, 3, 5), 1, 4)
    View(P=2, A=4, K=3, J=1, B=5)
    """
    n = shape[0]
    if n % virtual_batch_size:
        raise ValueError(f"ghost_batch_norm: virtual_batch_size must divide "
                         f"the batch size {n} when ghost-batch statistics are "
                         f"used (training, or no running statistics), got "
                         f"virtual_batch_size={virtual_batch_size} (input "
                         f"shape {shape})")
    whole = channel_view(shape, axis, per_sample=False)
    rows = virtual_batch_size * math.prod(shape[1:axis])   # A per ghost batch
    return View(n // virtual_batch_size, rows, whole.K, whole.J, whole.B)
