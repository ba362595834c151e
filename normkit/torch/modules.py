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

from .. import distributed, registry, schemes
from ..schemes.sync import send_failure
from ._ops import NormkitInputError, forward, register_scheme

__all__ = ["SchemeModule", "module", "BatchNorm1d", "BatchNorm2d",
           "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm", "BatchRenorm",
           "GhostBatchNorm"]

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
        self._register(device)
        self.train(scheme.training)

    def _register(self, device=None):
        """Register the scheme with the operators (``_entry``) and keep its
        key as the second size of the empty tensor ``_normkit_key``, where
        ``torch.compile`` reads it as a symbol after a second module's key
        (see :func:`normkit.torch._ops.forward`).  Not a buffer: dynamo
        holds the shapes of buffers static, and it stays out of the
        state_dict; :meth:`_apply` moves it with the module."""
        key, self._entry = register_scheme(self.scheme, self._param_names,
                                           self._buffer_names)
        self._normkit_key = torch.empty((0, key), dtype=torch.uint8,
                                        device=device)

    @property
    def _operator_key(self):
        """``(key, signature)``, as the operators take them."""
        return self._normkit_key.shape[1], self._entry.signature

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
        return forward(input, params, buffers, self, self.training)

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

    def reset_parameters(self):
        """Running statistics (:meth:`reset_running_stats`) and parameters
        back to their initial values, as torch's ``reset_parameters``: the
        values the scheme was built with (``weight`` 1 and ``bias`` 0 for
        the built-ins; a plug-in's own)."""
        self.reset_running_stats()
        with torch.no_grad():
            for name in self._param_names:
                initial = np.asarray(getattr(self.scheme, name))
                getattr(self, name).copy_(torch.from_numpy(initial))

    def extra_repr(self):
        return self.scheme.extra_repr()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_entry", None)
        return state

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._normkit_key = fn(self._normkit_key)  # uint8: no dtype cast
        return module

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register(self._normkit_key.device)


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
                 track_running_stats=True, device=None, dtype=None, *,
                 bias=True):
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = track_running_stats
        super().__init__(self.scheme_class(num_features, eps, momentum, affine,
                                           track_running_stats, bias=bias),
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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    scheme_class = schemes.BatchNorm3d
    expected_ndim = (5,)


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` on normkit's kernels: BatchNorm over a
    batch split across the processes of ``process_group``, CPU tensors
    over gloo included (CUDA tensors go through the same operator, with
    NCCL moving the per-channel arrays on the device).

    In training every rank normalizes its slice with the mean and biased
    variance of the global batch,

    .. math::

        y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\gamma + \\beta,
        \\qquad (n, \\mu, M_2) = \\mathrm{Chan}\\big((n_r, \\mu_r, M_{2,r})
        _{r = 0 \\ldots R-1}\\big), \\quad \\sigma^2 = M_2 / n,

    the per-channel moments of every rank merged exactly in float64, in
    rank order, after ONE all-gather (:class:`normkit.SyncBatchNorm`, the
    scheme this module runs); the running statistics are updated
    identically on every rank with the global unbiased variance ``M2 / (n
    - 1)``.  The backward (normkit's, through autograd) makes ONE
    all-reduce of the per-channel sums ``sum g*dy`` and ``sum g*dy*xhat``.
    ``weight`` and ``bias`` gradients are this rank's contributions, as in
    torch: DistributedDataParallel averages them with the other
    parameters' gradients.  Inference uses the running statistics and
    makes no collective (``track_running_stats=False``: the local
    slice's, as torch does).

    Input ``(N, C, *)`` of any rank >= 2, contiguous or channels-last
    (handed to the kernels as the channels-last view, no copy), float16,
    bfloat16, float32 or float64.  Ranks may hold different numbers of
    samples, or none: a rank whose slice is ``(0, C, ...)`` still joins
    both collectives (contributing ``n = 0`` and zero sums), returns an
    empty output and zero ``weight``/``bias`` gradients, and updates its
    running statistics like every other rank; more than one value per
    channel is needed over all ranks.

    The communicator (:func:`normkit.distributed.from_torch` over
    ``process_group``, default the world group) is made at its first use,
    inside the operator, so the module can be built (and converted) before
    ``init_process_group``, and a compiled model makes it at run time too.
    While ``torch.distributed`` is not initialized, the module is
    BatchNorm on the local batch (as torch's).

    Errors: an input this module rejects (not a float tensor, another
    device than the parameters, fewer than 2 dimensions, another number of
    channels) raises on its rank, which still joins the step's collective
    with a failure flag, so that every other rank raises a
    ``RuntimeError`` naming it instead of waiting (nothing is updated
    anywhere).  That is eager mode: under ``torch.compile`` the bad rank
    fails while tracing, and the others wait for the group's
    ``timeout``, as they do for a rank that never reaches the module.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        None: cumulative average.
    affine : bool, default True
    track_running_stats : bool, default True
    process_group : torch.distributed.ProcessGroup, optional
        The ranks sharing the batch (default: the world group).
    device, dtype : optional
        Of the parameters and buffers.
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.
    communicator : normkit.distributed.Communicator, optional
        Keyword only: a communicator to use instead of ``process_group``
        (:func:`normkit.distributed.from_mpi`, a
        :class:`~normkit.distributed.CountingCommunicator` to count the
        collectives).

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> bn = normkit.torch.SyncBatchNorm(3)   # under torchrun: the world group
    >>> x = torch.randn(4, 3, 5, 5)
    >>> torch.allclose(bn(x), torch.nn.BatchNorm2d(3)(x), atol=1e-5)  # one process
    True
    >>> sorted(bn.state_dict()) == sorted(torch.nn.SyncBatchNorm(3).state_dict())
    True
    """

    scheme_class = schemes.SyncBatchNorm

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None,
                 dtype=None, *, bias=True, communicator=None):
        self.process_group = process_group
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.scheme.communicator = (
            _GroupCommunicator(process_group) if communicator is None
            else distributed.check_communicator(communicator, "SyncBatchNorm"))

    def _check(self, x):
        if isinstance(x, torch.Tensor) and x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected at least 2D "
                             f"input (got {x.dim()}D input)")
        super()._check(x)

    def forward(self, input):
        """Normalize this rank's slice ``input`` with the statistics of
        every rank's slice (training) or the running ones."""
        if self.training and not torch.compiler.is_compiling():
            comm = self.scheme.communicator
            if comm.size > 1:
                try:
                    self._check(input)
                    self.scheme.view(tuple(input.shape))    # channels
                except Exception:
                    send_failure(comm, self.num_features)   # the others raise
                    raise
        return super().forward(input)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """:func:`normkit.torch.convert_sync_batchnorm`, as torch's
        classmethod.

        Parameters
        ----------
        module : torch.nn.Module
        process_group : torch.distributed.ProcessGroup, optional

        Returns
        -------
        torch.nn.Module

        Examples
        --------
        >>> import torch
        >>> from normkit.torch import SyncBatchNorm
        >>> model = SyncBatchNorm.convert_sync_batchnorm(
        ...     torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
        >>> type(model[0]).__name__
        'SyncBatchNorm'
        """
        from .convert import convert_sync_batchnorm
        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")


class _GroupCommunicator:
    """The communicator of a ``torch.distributed`` process group, made when
    first used (inside the operator, so also under ``torch.compile``):
    :func:`normkit.distributed.from_torch` once ``torch.distributed`` is
    initialized, one process (:func:`normkit.distributed.local`) until
    then.  Copies and pickles carry the group, not the connection."""

    def __init__(self, group=None):
        self.group = group
        self._inner = None

    @property
    def inner(self):
        if self._inner is None:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                return distributed.local()
            self._inner = distributed.from_torch(self.group)
        return self._inner

    rank = property(lambda self: self.inner.rank)
    size = property(lambda self: self.inner.size)
    device_arrays = property(lambda self: self.inner.device_arrays)

    def allgather(self, a):
        return self.inner.allgather(a)

    def allreduce(self, a):
        return self.inner.allreduce(a)

    def __reduce__(self):
        return type(self), (self.group,)

    def __deepcopy__(self, memo):
        return type(self)(self.group)

    def __repr__(self):
        return f"process_group({self.group!r})"


class _InstanceNorm(SchemeModule):
    scheme_class = schemes.InstanceNorm

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None, *,
                 bias=True):
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = track_running_stats
        # torch's InstanceNorm never counts batches and reads momentum=None
        # as 0: the counter stays a buffer (for state_dict) but is not
        # handed to the scheme
        super().__init__(self.scheme_class(
            num_features, eps, 0.0 if momentum is None else momentum, affine,
            track_running_stats, bias=bias), device=device, dtype=dtype)
        self._buffer_names = tuple(name for name in self._buffer_names
                                   if name != "num_batches_tracked")
        self._register(device)


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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in torch.

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> normkit.torch.GroupNorm(2, 4)(torch.randn(2, 4, 3, 3)).shape
    torch.Size([2, 4, 3, 3])
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True,
                 device=None, dtype=None, *, bias=True):
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.affine = affine
        super().__init__(schemes.GroupNorm(num_groups, num_channels, eps,
                                           affine, bias=bias),
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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in :class:`normkit.BatchRenorm`.

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> layer = normkit.torch.BatchRenorm(3)
    >>> layer(torch.randn(8, 3, 4)).shape, layer.running_std.shape
    (torch.Size([8, 3, 4]), torch.Size([3]))
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, rmax=3.0,
                 dmax=5.0, affine=True, device=None, dtype=None, *, bias=True):
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = True
        super().__init__(schemes.BatchRenorm(num_features, eps, momentum, rmax,
                                             dmax, affine, bias=bias),
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
    bias : bool, default True
        Keyword only: with ``affine``, whether there is a ``bias``
        (``bias=False``: a ``weight`` alone), as in :class:`normkit.GhostBatchNorm`.

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
                 device=None, dtype=None, *, bias=True):
        self.num_features = num_features
        self.virtual_batch_size = virtual_batch_size
        self.affine = affine
        self.track_running_stats = track_running_stats
        super().__init__(schemes.GhostBatchNorm(num_features,
                                                virtual_batch_size, eps,
                                                momentum, affine,
                                                track_running_stats,
                                                bias=bias),
                         device=device, dtype=dtype)
