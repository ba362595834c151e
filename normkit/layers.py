"""Normalization layers: parameters, running statistics and a backward pass.

Every layer follows one protocol, :class:`Normalizer`: ``y = layer(x)``,
``dx = layer.backward(dy)`` for the most recent forward (filling
``layer.grads``), ``train()`` / ``eval()``, ``state_dict()`` and
``load_state_dict()``.  A layer keeps a reference to its last input (not a
copy) for the backward, as an autograd tape would.

A new scheme that only needs "normalize over this view" subclasses
:class:`Normalizer` and implements :meth:`Normalizer.view` (and sets
:attr:`Normalizer.centered` false to normalize by the root mean square);
a scheme with its own use of the statistics implements
:meth:`Normalizer._forward` and, when its gradient is not that of
:func:`normkit.normalize_backward`, :meth:`Normalizer._backward`.  See
``docs/extending.rst``.

Layers keep their parameters and running statistics where their input
lives: a forward with a CUDA device array moves them to the device (a
forward with a host array moves them back), and :meth:`Normalizer.state_dict`
always returns host NumPy copies.
"""

import numpy as np

from . import _device, functional as F
from ._checks import (check_axis, check_eps, check_input, check_momentum,
                      check_ndim, check_positive_int)

__all__ = ["Normalizer", "RunningStatsNormalizer", "BatchNorm", "BatchNorm1d", "BatchNorm2d",
           "BatchNorm3d", "InstanceNorm", "LayerNorm", "GroupNorm",
           "BatchRenorm"]


class Normalizer:
    """Base class of every normalization layer.

    Subclasses set which arrays they own (:attr:`state_names`) and implement
    :meth:`_forward`; a scheme whose statistics are simply those of its
    input over some view can implement :meth:`view` instead and inherit
    everything else (forward, backward, state handling).

    Parameters
    ----------
    param_shape : tuple of int or None
        Shape of ``weight`` and ``bias`` (None: no affine parameters).
    eps : float
    bias : bool
        With ``param_shape``, whether there is a ``bias`` besides the
        ``weight`` (False: a gain only, as in RMSNorm).
    """

    #: Names of the arrays that make up the state (None entries are skipped).
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

    # ---- the extension point -------------------------------------------

    def view(self, shape):
        """Canonical :class:`~normkit.engine.View` of an input of ``shape``.

        Override this (and nothing else) for a scheme that normalizes each
        group of the view with its own statistics; raise ``ValueError`` for
        shapes the scheme does not accept.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement "
                                  f"view() or _forward()")

    def _forward(self, x):
        """Return ``(y, saved)``; the default normalizes over :meth:`view`."""
        check_input(x, "x", type(self).__name__)
        view = self.view(x.shape)
        size = view.K * view.J
        if self.weight is not None and self.weight.size != size:
            raise ValueError(f"{type(self).__name__}: weight has "
                             f"{self.weight.size} values but the input needs "
                             f"{size}")
        return F.normalize(x, view, self.weight, self.bias, self.eps,
                           return_saved=True, variant=type(self).__name__,
                           centered=self.centered)

    def _backward(self, dy, x, saved):
        """Return ``(dx, grads)`` for the ``saved`` record of :meth:`_forward`.

        The default is :func:`normkit.normalize_backward`, with ``grads``
        holding ``weight`` and ``bias`` where the layer has them.
        """
        dx, dweight, dbias = F.normalize_backward(dy, x, saved)
        grads = {name: grad for name, grad in (("weight", dweight),
                                               ("bias", dbias))
                 if getattr(self, name) is not None}
        return dx, grads

    # ---- the protocol ----------------------------------------------------

    def forward(self, x):
        """Normalize ``x``; remembers what the backward needs."""
        if _device.is_device_array(x):
            x = _device.as_device_array(x)
        self._follow(x)
        y, saved = self._forward(x)
        self._tape = (x, saved)
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to the input of the most recent forward.

        Sets ``self.grads`` to the parameters' gradients by name (e.g.
        ``{"weight": dweight, "bias": dbias}``; empty without parameters),
        and returns ``dx``.  Bad ``dy`` raises and leaves ``grads`` as it
        was.
        """
        if self._tape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before "
                               f"any forward")
        x, saved = self._tape
        dx, self.grads = self._backward(dy, x, saved)
        return dx

    def _follow(self, x):
        """Move the state arrays to where ``x`` lives (device or host)."""
        on_device = _device.is_device_array(x)
        move = _device.to_device if on_device else _device.to_host
        for name in self.state_names:
            value = getattr(self, name)
            if (value is not None and not isinstance(value, int)
                    and _device.is_device_array(value) != on_device):
                setattr(self, name, move(value))

    def train(self, mode=True):
        """Switch to training mode (``mode=False``: inference); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Switch to inference mode; returns self."""
        return self.train(False)

    def state_dict(self):
        """Host NumPy copies of the state arrays, keyed by name."""
        state = {}
        for name in self.state_names:
            value = getattr(self, name)
            if value is not None:
                state[name] = _device.to_host(value)  # ints become 0-d
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
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing "
                           f"keys {missing}, unexpected keys {extra}")
        loaded = {}
        for name, current in own.items():
            value = np.asarray(state[name])
            if value.shape != current.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: "
                                 f"{name} must have shape {current.shape}, got "
                                 f"{value.shape}")
            if value.dtype.kind not in "fiu" or (value.dtype.kind != "f"
                                                  and current.dtype.kind == "f"):
                raise ValueError(f"{type(self).__name__}.load_state_dict: "
                                 f"{name} must have a {current.dtype} "
                                 f"compatible dtype, got {value.dtype}")
            loaded[name] = value.astype(current.dtype)
        for name, value in loaded.items():
            if value.ndim == 0:
                value = int(value)
            elif _device.is_device_array(getattr(self, name)):
                value = _device.to_device(value)
            setattr(self, name, value)

    def extra_repr(self):
        return f"eps={self.eps}"

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class _RunningStats(Normalizer):
    """A layer with per-channel running statistics and a batch counter."""

    #: Name of the running spread buffer (``running_var`` or ``running_std``).
    spread_name = "running_var"
    spread_init = 1.0

    def __init__(self, num_features, eps, momentum, affine, track_running_stats,
                 axis):
        name = type(self).__name__
        self.num_features = check_positive_int(num_features, "num_features", name)
        super().__init__((self.num_features,) if affine else None, eps)
        check_momentum(momentum, name)
        self.momentum = momentum
        self.axis = axis
        self.track_running_stats = bool(track_running_stats)
        self.state_names = ("weight", "bias", "running_mean", self.spread_name,
                            "num_batches_tracked")
        self.reset_running_stats()

    def reset_running_stats(self):
        """Zero mean, unit spread, no batches counted."""
        track = self.track_running_stats
        self.running_mean = np.zeros(self.num_features) if track else None
        setattr(self, self.spread_name,
                np.full(self.num_features, self.spread_init) if track else None)
        self.num_batches_tracked = 0 if track else None

    def _counted(self, updating, call):
        """Run ``call(num_batches_tracked)``; count the batch if it updated."""
        result = call(self.num_batches_tracked)
        if updating:
            self.num_batches_tracked += 1
        return result

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}")


#: Public name of the base of layers with running statistics (``momentum``,
#: ``running_mean``, ``running_var`` or ``running_std``,
#: ``num_batches_tracked``, ``reset_running_stats()``) for new schemes.
RunningStatsNormalizer = _RunningStats


class BatchNorm(_RunningStats):
    """Batch normalization over channel ``axis``; see :func:`normkit.batch_norm`.

    Training uses batch statistics and updates the running ones; inference
    uses the running statistics (batch statistics when
    ``track_running_stats`` is false).
    """

    #: Allowed input dimensions (None: any with at least 2).
    allowed_ndim = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis)

    def _forward(self, x):
        if self.allowed_ndim is not None:
            check_input(x, "x", type(self).__name__)
            check_ndim(x, type(self).__name__, allowed=self.allowed_ndim)
        updating = self.training and self.track_running_stats
        return self._counted(updating, lambda count: F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps, self.axis,
            num_batches_tracked=count, return_saved=True))


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) input."""

    allowed_ndim = (2, 3)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) input."""

    allowed_ndim = (4,)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) input."""

    allowed_ndim = (5,)


class InstanceNorm(_RunningStats):
    """Instance normalization; see :func:`normkit.instance_norm`.

    Input statistics in training; in inference too unless
    ``track_running_stats`` is true.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, axis=1):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, axis)

    def _forward(self, x):
        use_input = self.training or not self.track_running_stats
        updating = use_input and self.track_running_stats
        return self._counted(updating, lambda count: F.instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            use_input, self.momentum, self.eps, self.axis,
            num_batches_tracked=count, return_saved=True))


class BatchRenorm(_RunningStats):
    """Batch Renormalization; see :func:`normkit.batch_renorm`.

    ``rmax`` and ``dmax`` are plain attributes that may change between steps,
    e.g. ``layer.rmax, layer.dmax = normkit.batch_renorm_schedule(step)``.
    """

    spread_name = "running_std"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, rmax=3.0,
                 dmax=5.0, affine=True, axis=1):
        super().__init__(num_features, eps, momentum, affine, True, axis)
        self.rmax = rmax
        self.dmax = dmax

    def _forward(self, x):
        return self._counted(self.training, lambda count: F.batch_renorm(
            x, self.running_mean, self.running_std, self.weight, self.bias,
            self.training, self.momentum, self.eps, self.rmax, self.dmax,
            self.axis, num_batches_tracked=count, return_saved=True))

    def extra_repr(self):
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}"


class LayerNorm(Normalizer):
    """Layer normalization over the trailing ``normalized_shape`` axes; see
    :func:`normkit.layer_norm`."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        self.normalized_shape = F._normalized_shape(normalized_shape, "LayerNorm")
        super().__init__(self.normalized_shape if elementwise_affine else None,
                         eps)

    def _forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                            self.eps, return_saved=True)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class GroupNorm(Normalizer):
    """Group normalization; see :func:`normkit.group_norm`.

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

    def _forward(self, x):
        check_input(x, "x", "GroupNorm")
        check_ndim(x, "GroupNorm", min_ndim=2)
        axis = check_axis(self.axis, x.ndim, "GroupNorm", min_axis=1)
        if x.shape[axis] != self.num_channels:
            raise ValueError(f"GroupNorm: expected {self.num_channels} channels "
                             f"on axis {self.axis}, got input shape {x.shape}")
        return F.group_norm(x, self.num_groups, self.weight, self.bias,
                            self.eps, self.axis, return_saved=True)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, axis={self.axis}"
