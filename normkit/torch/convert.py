"""Model surgery: swap torch's normalization layers for normkit's, fold and
freeze BatchNorm."""

import torch
from torch import nn

from ..fold import fold_batch_norm_weights
from . import modules as nk

__all__ = ["convert", "convert_sync_batchnorm", "fold_batch_norm",
           "freeze_batch_norm", "FrozenBatchNorm", "DEFAULT_MAPPING"]


def _carry(new, old):
    """``new`` with ``old``'s state, device, dtype and mode."""
    tensors = list(old.parameters()) + [b for b in old.buffers()
                                        if b.is_floating_point()]
    if tensors:
        new.to(device=tensors[0].device, dtype=tensors[0].dtype)
    new.load_state_dict(old.state_dict())
    new.requires_grad_(False)
    for name, p in old.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)
    return new.train(old.training)


def _has_bias(layer):
    """The ``bias`` flag of a torch layer (``bias=False``: an affine layer
    with a weight alone)."""
    return getattr(layer, "bias", None) is not None


def _channel_norm(cls):
    """Builder of ``cls`` (a BatchNorm or InstanceNorm module) from a torch
    layer of the same constructor."""
    def build(layer):
        return _carry(cls(layer.num_features, layer.eps, layer.momentum,
                          layer.affine, layer.track_running_stats,
                          bias=_has_bias(layer)), layer)
    return build


def _layer_norm(layer):
    return _carry(nk.LayerNorm(layer.normalized_shape, layer.eps,
                               layer.elementwise_affine, _has_bias(layer)),
                  layer)


def _group_norm(layer):
    return _carry(nk.GroupNorm(layer.num_groups, layer.num_channels, layer.eps,
                               layer.affine, bias=_has_bias(layer)), layer)


def _rms_norm(layer):
    return _carry(nk.RMSNorm(layer.normalized_shape, layer.eps,
                             layer.elementwise_affine), layer)


#: torch layer type -> function building normkit's equivalent from a layer.
DEFAULT_MAPPING = {
    nn.BatchNorm1d: _channel_norm(nk.BatchNorm1d),
    nn.BatchNorm2d: _channel_norm(nk.BatchNorm2d),
    nn.BatchNorm3d: _channel_norm(nk.BatchNorm3d),
    nn.InstanceNorm1d: _channel_norm(nk.InstanceNorm1d),
    nn.InstanceNorm2d: _channel_norm(nk.InstanceNorm2d),
    nn.InstanceNorm3d: _channel_norm(nk.InstanceNorm3d),
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.RMSNorm: _rms_norm,
}


def _build_for(layer, mapping):
    for cls in type(layer).__mro__:
        if cls in mapping:
            return mapping[cls]
    return None


def convert(model, mapping=None):
    """Replace torch's normalization layers of ``model`` by normkit's.

    Every ``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``, ``LayerNorm``,
    ``GroupNorm`` and ``RMSNorm`` becomes the ``normkit.torch`` module of
    the same name, carrying its parameters, buffers, device, dtype,
    ``requires_grad`` and train/eval mode.  ``model`` is changed in place
    and returned (a normalization layer passed as ``model`` is returned
    converted).

    Parameters
    ----------
    model : torch.nn.Module
    mapping : dict, optional
        torch layer type -> function ``f(layer) -> torch.nn.Module``,
        consulted before ``normkit.torch.DEFAULT_MAPPING`` (by the layer's
        type and its base classes); a function may return any module, e.g. another
        scheme.

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3),
    ...                             torch.nn.BatchNorm2d(64))
    >>> normkit.torch.convert(model)[1].__class__.__name__
    'BatchNorm2d'
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3),
    ...                             torch.nn.BatchNorm2d(64))
    >>> type(normkit.torch.convert(model, {torch.nn.BatchNorm2d:
    ...     lambda bn: normkit.torch.GroupNorm(32, bn.num_features)})[1]).__name__
    'GroupNorm'
    """
    table = {**DEFAULT_MAPPING, **(mapping or {})}

    def replace(layer):
        if isinstance(layer, nk.SchemeModule):
            return None
        build = _build_for(layer, table)
        return None if build is None else build(layer)

    return _swap(model, replace)


def _swap(model, replace):
    """``model`` with every module ``m`` for which ``replace(m)`` is not
    None replaced by it (in place; the top module is returned replaced);
    normkit's modules are not descended into."""
    top = replace(model)
    if top is not None:
        return top
    for parent in list(model.modules()):
        if isinstance(parent, nk.SchemeModule):
            continue
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is not None and new is not child:
                setattr(parent, name, new)
    return model


def convert_sync_batchnorm(model, process_group=None):
    """Replace every BatchNorm of ``model`` by
    :class:`normkit.torch.SyncBatchNorm` over ``process_group``.

    Every ``torch.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm``)
    and every ``normkit.torch`` ``BatchNorm1d/2d/3d`` becomes a
    :class:`~normkit.torch.SyncBatchNorm` carrying its parameters, buffers,
    device, dtype, ``requires_grad`` and train/eval mode; other layers
    (normkit's SyncBatchNorm included) are left alone.  ``model`` is
    changed in place and returned (a BatchNorm passed as ``model`` is
    returned converted), as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    does.  Convert before wrapping the model in
    ``DistributedDataParallel``; ``init_process_group`` may come later
    (the communicator is made at its first use).

    Parameters
    ----------
    model : torch.nn.Module
    process_group : torch.distributed.ProcessGroup, optional
        The ranks sharing each batch (default: the world group).

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3),
    ...                             torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = normkit.torch.convert_sync_batchnorm(model)
    >>> type(model[1]).__name__, model[1].num_features
    ('SyncBatchNorm', 8)
    """
    def replace(layer):
        if (not isinstance(layer, _BATCH_NORMS)
                or isinstance(layer, nk.SyncBatchNorm)):
            return None
        return _carry(nk.SyncBatchNorm(layer.num_features, layer.eps,
                                       layer.momentum, layer.affine,
                                       layer.track_running_stats,
                                       process_group, bias=_has_bias(layer)),
                      layer)

    return _swap(model, replace)


# --------------------------------------------------------------------------
# folding and freezing BatchNorm
# --------------------------------------------------------------------------

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nk._BatchNorm)


def _foldable_bn(bn):
    return (isinstance(bn, _BATCH_NORMS) and not bn.training
            and getattr(bn, "running_mean", None) is not None)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return (isinstance(m, nk.SchemeModule)
                or super().is_leaf_module(m, qualname))


def _pairs_fx(model):
    """(layer name, bn name) pairs where a conv/linear call's only user is
    a BatchNorm call, each module called exactly once; None when the
    model cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception:
        return None
    modules = dict(model.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target],
                                                       _FOLD_INTO):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn = users[0]
        if (len(calls[node.target]) == 1 and len(calls[bn.target]) == 1
                and bn.args[:1] == (node,) and len(bn.args) == 1
                and not bn.kwargs):
            pairs.append((node.target, bn.target))
    return pairs


def _pairs_sequential(model):
    """(layer name, bn name) pairs of consecutive children of every
    ``nn.Sequential``."""
    pairs = []
    for prefix, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            join = (prefix + ".") if prefix else ""
            pairs.append((join + a, join + b))
    return pairs


def _set(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def fold_batch_norm(model):
    """Fold every eval-mode BatchNorm into the convolution or linear layer
    that feeds it; returns ``model``, changed in place.

    The pairs are found on the ``torch.fx`` graph of ``model`` (normkit's
    modules are leaves): a ``Conv1d/2d/3d`` or ``Linear`` call whose output
    has exactly one user, a BatchNorm call (torch's or normkit's) in eval
    mode with running statistics, each module called exactly once.  A
    layer whose output feeds more than one place is left alone.  Models
    ``torch.fx`` cannot trace fall back to a conservative rule: consecutive
    children of an ``nn.Sequential``.  The layer gets the folded weight and
    a bias (:func:`normkit.fold_batch_norm_weights`: the bias includes the
    BN scale; grouped and depthwise convolutions fold the same way) and
    the BatchNorm becomes ``nn.Identity``.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False),
    ...                             torch.nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> want = model(x)
    >>> folded = normkit.torch.fold_batch_norm(model)
    >>> type(folded[1]).__name__, torch.allclose(folded(x), want, atol=1e-5)
    ('Identity', True)
    """
    pairs = _pairs_fx(model)
    if pairs is None:
        pairs = _pairs_sequential(model)
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        if not isinstance(layer, _FOLD_INTO) or not _foldable_bn(bn):
            continue
        if layer.weight.shape[0] != bn.running_mean.shape[0]:
            continue
        host = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        weight, bias = fold_batch_norm_weights(
            host(layer.weight), host(layer.bias), host(bn.running_mean),
            host(bn.running_var), host(bn.weight), host(bn.bias), bn.eps)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            bias = torch.from_numpy(bias).to(layer.weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias)
            else:
                layer.bias.copy_(bias)
        _set(model, bn_name, nn.Identity())
    return model


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, as
    torchvision's ``FrozenBatchNorm2d``: ``y = x * s + (bias -
    running_mean * s)`` with ``s = weight / sqrt(running_var + eps)``, all
    four buffers (nothing is learned or updated, in either mode), for
    (N, C, ...) input.

    Parameters
    ----------
    num_features : int
    eps : float, default 1e-5

    Examples
    --------
    >>> import torch
    >>> from normkit.torch import FrozenBatchNorm
    >>> FrozenBatchNorm(3)(torch.ones(2, 3, 4)).shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        """``x * s + shift`` per channel (axis 1)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(model):
    """Replace every BatchNorm (torch's or normkit's) with running
    statistics by a :class:`FrozenBatchNorm` carrying its statistics and
    affine parameters, for fine-tuning with fixed normalization; returns
    ``model``, changed in place.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> import normkit.torch
    >>> model = normkit.torch.freeze_batch_norm(
    ...     torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    >>> type(model[0]).__name__, len(list(model.parameters()))
    ('FrozenBatchNorm', 0)
    """
    def frozen(bn):
        new = FrozenBatchNorm(bn.num_features, bn.eps)
        ref = bn.running_mean
        new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                new.weight.copy_(bn.weight)
            if bn.bias is not None:
                new.bias.copy_(bn.bias)
        return new

    def eligible(m):
        return (isinstance(m, _BATCH_NORMS)
                and getattr(m, "running_mean", None) is not None)

    if eligible(model):
        return frozen(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child):
                setattr(parent, name, frozen(child))
    return model
