"""normkit inside PyTorch models (the ``normkit[torch]`` extra).

- every scheme as a ``torch.nn.Module``: :class:`SchemeModule` for any
  :class:`normkit.Normalizer` (plug-ins included, through :func:`module`),
  and torch's layers by name and constructor signature
  (:class:`BatchNorm2d`, :class:`GroupNorm`, ...);
- autograd through normkit's own backward, as the custom operators
  ``torch.ops.normkit.scheme_forward`` / ``scheme_backward`` (so
  ``torch.compile(model, fullgraph=True)`` keeps them in one graph); in
  plain eager mode the modules run the same two functions as one
  ``torch.autograd.Function``, without the operators' dispatch;
- :class:`SyncBatchNorm` over ``torch.distributed`` (gloo on the CPU
  too) and :func:`convert_sync_batchnorm`;
- :func:`convert` (swap a model's normalization layers),
  :func:`fold_batch_norm` and :func:`freeze_batch_norm`.

CPU tensors reach the kernels as NumPy views of their memory
(channels-last tensors as the channels-last view), CUDA tensors through
``__cuda_array_interface__``.  ``import normkit`` never imports this module
(nor torch).
"""

from ._ops import NormkitInputError, scheme_backward, scheme_forward
from .convert import (DEFAULT_MAPPING, FrozenBatchNorm, convert,
                      convert_sync_batchnorm, fold_batch_norm,
                      freeze_batch_norm)
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm,
                      GhostBatchNorm, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm,
                      SchemeModule, SyncBatchNorm, module)

__all__ = ["SchemeModule", "module", "BatchNorm1d", "BatchNorm2d",
           "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm", "BatchRenorm",
           "GhostBatchNorm", "convert", "convert_sync_batchnorm",
           "fold_batch_norm", "freeze_batch_norm", "FrozenBatchNorm",
           "DEFAULT_MAPPING", "NormkitInputError", "scheme_forward",
           "scheme_backward"]
