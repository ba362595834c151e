"""Every normkit scheme as a ``torch.nn.Module``.

:class:`SchemeModule` wraps any :class:`normkit.Normalizer` (built-in or
plug-in): the scheme's parameters become ``nn.Parameter`` and its running
statistics buffers, under the scheme's own names (which are torch's:
``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), and every call runs the scheme on views of them
through the custom operators of :mod:`normkit.torch._ops`.  The named
classes below take the constructor arguments of torch's modules.
"""

import numpy as np
import torch
from torch import nn

from .. import registry, schemes
from ._ops import NormkitInputError, register_scheme, scheme_forward

__all__ = ["SchemeModule", "module", "BatchNorm1d", "BatchNorm2d",
           "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "GroupNorm", "RMSNorm", "BatchRenorm", "GhostBatchNorm"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_buffer(name, value):
    return (isinstance(value, (int, np.integer)) or name.startswith("running_")
            or name == "num_batches_tracked")


class SchemeModule(nn.Module):
    """A torch module running a normkit scheme.

    Parameters
    ----------
    scheme : normkit.Normalizer
        The scheme; its settings (``eps``, ``momentum``, Batch
        Renormalization's ``rmax``, ...) are read at every call, and are
        attributes of the module too: ``module.rmax = 2.0`` changes the
        scheme's and takes effect at the next call.
    buffer_names : sequence of str, optional
        Names in ``scheme.state_names`` that are buffers (not learned);
        default: the scheme's ``buffer_names`` attribute if it has one,
        else names starting with ``running_`` and integer counters.
        Every other array in ``state_names`` is an ``nn.Parameter``.
    device, dtype : optional
        Of the parameters and float buffers (default: torch's default
        dtype on the CPU).

    Examples
    --------
    >>> import torch
    >>> import normkit
    >>> from normkit.torch import SchemeModule
    >>> layer = SchemeModule(normkit.GroupNorm(2, 4))
    >>> layer(torch.randn(3, 4, 5)).shape
    torch.Size([3, 4, 5])
    >>> sorted(name for name, _ in layer.named_parameters())
    ['bias', 'weight']
    """

    #: ndim of the inputs the module accepts (None: the scheme decides).
    expected_ndim = None

    def __init__(self, scheme, buffer_names=None, device=None, dtype=None):
        super().__init__()
        if not isinstance(scheme, schemes.Normalizer):
            raise TypeError(f"SchemeModule: scheme must be a normkit.Normalizer, "
                            f"got {type(scheme).__name__}")
        self.scheme = scheme
        if buffer_names is None:
            buffer_names = getattr(scheme, "buffer_names", None)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        params, buffers = [], []
        for name in scheme.state_names:
            value = getattr(scheme, name, None)
            is_buffer = (name in buffer_names if buffer_names is not None
                         else _is_buffer(name, value))
            if value is None:
                (self.register_buffer if is_buffer
                 else self.register_parameter)(name, None)
                continue
            if isinstance(value, (int, np.integer)):
                self.register_buffer(name, torch.tensor(int(value),
                                                        dtype=torch.long,
                                                        device=device))
                buffers.append(name)
                continue
            tensor = torch.as_tensor(np.asarray(value), device=device).to(dtype)
            if is_buffer:
                self.register_buffer(name, tensor.clone())
                buffers.append(name)
            else:
                self.register_parameter(name, nn.Parameter(tensor.clone()))
                params.append(name)
        self._param_names = tuple(params)
        self._buffer_names = tuple(buffers)
        self._key, self._entry = register_scheme(scheme, params, buffers)
        self.train(scheme.training)

    # the scheme's settings (eps, momentum, rmax, ...) read and written
    # through the module, as torch's modules have them: every call reads them
    def _setting(self, name):
        scheme = self.__dict__.get("scheme")
        return (scheme is not None and not name.startswith("_")
                and name not in ("training", "grads")
                and name not in scheme.state_names and name in vars(scheme)
                and name not in self.__dict__)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self._setting(name):
                return getattr(self.__dict__["scheme"], name)
            raise

    def __setattr__(self, name, value):
        if self._setting(name):
            setattr(self.scheme, name, value)
        else:
            super().__setattr__(name, value)

    def _check(self, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise NormkitInputError(
                f"{name}: input must have a floating dtype (float16, bfloat16, "
                f"float32 or float64), got {x.dtype}")
        for label, names in (("parameter", self._param_names),
                             ("buffer", self._buffer_names)):
            for pname in names:
                t = (self._parameters if label == "parameter"
                     else self._buffers)[pname]
                if t.device != x.device:
                    raise NormkitInputError(
                        f"{name}: input is on {x.device} but {label} {pname!r} "
                        f"is on {t.device}; expected all tensors to be on the "
                        f"same device")
        if self.expected_ndim is not None and x.dim() not in self.expected_ndim:
            want = " or ".join(f"{n}D" for n in self.expected_ndim)
            raise ValueError(f"{name}: expected {want} input (got {x.dim()}D "
                             f"input)")

    def forward(self, input):
        """Normalize ``input`` (a float tensor on the parameters' device)."""
        self._check(input)
        params = [self._parameters[name] for name in self._param_names]
        buffers = [self._buffers[name] for name in self._buffer_names]
        y, _, _, _, new = scheme_forward(input, params, buffers, self._key,
                                         self.training)
        with torch.no_grad():
            for buffer, value in zip(buffers, new):
                buffer.copy_(value)
        return y

    def reset_running_stats(self):
        """Running statistics back to their initial values (zero mean,
        initial spread, no batches counted)."""
        init = getattr(self.scheme, "spread_init", 1.0)
        with torch.no_grad():
            for name in self._buffer_names:
                t = getattr(self, name)
                if name == "running_mean" or not t.is_floating_point():
                    t.zero_()
                elif name == getattr(self.scheme, "spread_name", None):
                    t.fill_(init)

    def extra_repr(self):
        return self.scheme.extra_repr()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_entry", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._key, self._entry = register_scheme(
            self.scheme, self._param_names, self._buffer_names)


def module(name, *, device=None, dtype=None, **kwargs):
    """A torch module for the scheme registered as ``name`` (plug-ins
    included): ``SchemeModule(normkit.create(name, **kwargs))``.

    Parameters
    ----------
    name : str
        A name of :func:`normkit.available`.
    device, dtype : optional
        Of the module's parameters and buffers.
    **kwargs
        The scheme's constructor arguments.

    Returns
    -------
    SchemeModule

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> gn = normkit.torch.module("group_norm", num_groups=2, num_channels=4)
    >>> gn(torch.randn(2, 4, 3)).shape
    torch.Size([2, 4, 3])
    """
    return SchemeModule(registry.create(name, **kwargs), device=device,
                        dtype=dtype)


# --------------------------------------------------------------------------
# torch's modules, by name and constructor signature
# --------------------------------------------------------------------------

class _BatchNorm(SchemeModule):
    scheme_class = schemes.BatchNorm

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = track_running_stats
        super().__init__(self.scheme_class(num_features, eps, momentum, affine,
                                           track_running_stats),
                         device=device, dtype=dtype)


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d`` on normkit's kernels: (N, C) or (N, C, L).

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default True
    track_running_stats : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> bn = normkit.torch.BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape, int(bn.num_batches_tracked)
    (torch.Size([8, 3]), 1)
    """

    scheme_class = schemes.BatchNorm1d
    expected_ndim = (2, 3)


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d`` on normkit's kernels: (N, C, H, W), either
    memory format.

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default True
    track_running_stats : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> bn = normkit.torch.BatchNorm2d(3)
    >>> x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    >>> bn(x).is_contiguous(memory_format=torch.channels_last)
    True
    """

    scheme_class = schemes.BatchNorm2d
    expected_ndim = (4,)


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d`` on normkit's kernels: (N, C, D, H, W).

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default True
    track_running_stats : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    scheme_class = schemes.BatchNorm3d
    expected_ndim = (5,)


class _InstanceNorm(SchemeModule):
    scheme_class = schemes.InstanceNorm

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None):
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = track_running_stats
        # torch's InstanceNorm never counts batches and reads momentum=None
        # as 0: the counter stays a buffer (for state_dict) but is not
        # handed to the scheme
        super().__init__(self.scheme_class(
            num_features, eps, 0.0 if momentum is None else momentum, affine,
            track_running_stats), device=device, dtype=dtype)
        self._buffer_names = tuple(name for name in self._buffer_names
                                   if name != "num_batches_tracked")
        self._key, self._entry = register_scheme(
            self.scheme, self._param_names, self._buffer_names)


class InstanceNorm1d(_InstanceNorm):
    """``torch.nn.InstanceNorm1d`` on normkit's kernels: (N, C, L), or
    unbatched (C, L) as torch accepts it (normalized as a batch of one).

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default False
    track_running_stats : bool, default False
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.InstanceNorm1d(3)(torch.randn(2, 3, 6)).shape
    torch.Size([2, 3, 6])
    >>> normkit.torch.InstanceNorm1d(3)(torch.randn(3, 6)).shape   # (C, L)
    torch.Size([3, 6])
    """

    scheme_class = schemes.InstanceNorm1d
    expected_ndim = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """``torch.nn.InstanceNorm2d`` on normkit's kernels: (N, C, H, W), or
    unbatched (C, H, W).

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default False
    track_running_stats : bool, default False
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.InstanceNorm2d(3)(torch.randn(2, 3, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
    """

    scheme_class = schemes.InstanceNorm2d
    expected_ndim = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    """``torch.nn.InstanceNorm3d`` on normkit's kernels: (N, C, D, H, W),
    or unbatched (C, D, H, W).

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default False
    track_running_stats : bool, default False
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.InstanceNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    scheme_class = schemes.InstanceNorm3d
    expected_ndim = (4, 5)


class LayerNorm(SchemeModule):
    """``torch.nn.LayerNorm`` on normkit's kernels.

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float, default 1e-5
    elementwise_affine : bool, default True
    bias : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.LayerNorm(5)(torch.randn(3, 5)).shape
    torch.Size([3, 5])
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True,
                 bias=True, device=None, dtype=None):
        scheme = schemes.LayerNorm(normalized_shape, eps, elementwise_affine)
        if not bias:
            scheme.bias = None
        self.normalized_shape = scheme.normalized_shape
        self.elementwise_affine = elementwise_affine
        super().__init__(scheme, device=device, dtype=dtype)


class GroupNorm(SchemeModule):
    """``torch.nn.GroupNorm`` on normkit's kernels: (N, C, ...), either
    memory format.

    Parameters
    ----------
    num_groups : int
    num_channels : int
    eps : float, default 1e-5
    affine : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.GroupNorm(2, 4)(torch.randn(2, 4, 3, 3)).shape
    torch.Size([2, 4, 3, 3])
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True,
                 device=None, dtype=None):
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.affine = affine
        super().__init__(schemes.GroupNorm(num_groups, num_channels, eps,
                                           affine),
                         device=device, dtype=dtype)


class RMSNorm(SchemeModule):
    """``torch.nn.RMSNorm`` on normkit's kernels (``eps=None``: the machine
    epsilon of the input's dtype, as torch).

    Parameters
    ----------
    normalized_shape : int or tuple of int
    eps : float or None, default None
    elementwise_affine : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.RMSNorm(4)(torch.randn(2, 4)).shape
    torch.Size([2, 4])
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True,
                 device=None, dtype=None):
        scheme = schemes.RMSNorm(normalized_shape, eps, elementwise_affine)
        self.normalized_shape = scheme.normalized_shape
        self.elementwise_affine = elementwise_affine
        super().__init__(scheme, device=device, dtype=dtype)


class BatchRenorm(SchemeModule):
    """Batch Renormalization (:class:`normkit.BatchRenorm`) as a torch
    module over (N, C, ...) input; buffers ``running_mean``,
    ``running_std``, ``num_batches_tracked``.  ``rmax`` and ``dmax`` may be
    changed between steps.

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    rmax : float, default 3.0
    dmax : float, default 5.0
    affine : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> layer = normkit.torch.BatchRenorm(3)
    >>> layer(torch.randn(8, 3, 4)).shape, layer.running_std.shape
    (torch.Size([8, 3, 4]), torch.Size([3]))
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, rmax=3.0,
                 dmax=5.0, affine=True, device=None, dtype=None):
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = True
        super().__init__(schemes.BatchRenorm(num_features, eps, momentum, rmax,
                                             dmax, affine),
                         device=device, dtype=dtype)


class GhostBatchNorm(SchemeModule):
    """Ghost BatchNorm (:class:`normkit.GhostBatchNorm`) as a torch module
    over (N, C, ...) input: training normalizes each virtual batch of
    ``virtual_batch_size`` samples with its own statistics.

    Parameters
    ----------
    num_features : int
    virtual_batch_size : int
    eps : float, default 1e-5
    momentum : float or None, default 0.1
    affine : bool, default True
    track_running_stats : bool, default True
    device, dtype : optional

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> layer = normkit.torch.GhostBatchNorm(3, virtual_batch_size=4)
    >>> layer(torch.randn(8, 3, 5)).shape
    torch.Size([8, 3, 5])
    """

    def __init__(self, num_features, virtual_batch_size, eps=1e-5,
                 momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        self.num_features = num_features
        self.virtual_batch_size = virtual_batch_size
        self.affine = affine
        self.track_running_stats = track_running_stats
        super().__init__(schemes.GhostBatchNorm(num_features,
                                                virtual_batch_size, eps,
                                                momentum, affine,
                                                track_running_stats),
                         device=device, dtype=dtype)
