"""Every normalizer is a scheme: a view plus what it does with the
statistics, on the public extension API of :mod:`normkit.schemes.base`.

- :mod:`normkit.schemes.base`: :class:`Normalizer`,
  :class:`RunningStatsNormalizer`, :class:`Saved`, :func:`normalize`,
  :func:`normalize_with_statistics`, :func:`normalize_backward`,
  :func:`update_running`, the extension API;
- :mod:`normkit.schemes.batch`: BatchNorm, Batch Renormalization, Ghost
  BatchNorm (statistics over the batch);
- :mod:`normkit.schemes.sync`: SyncBatchNorm (statistics over a batch
  split across processes, through :mod:`normkit.distributed`);
- :mod:`normkit.schemes.per_sample`: InstanceNorm, GroupNorm, LayerNorm,
  RMSNorm (statistics per sample);
- :mod:`normkit.schemes.reparam`: Weight and Spectral Normalization
  (reparametrizations of a weight).
"""

from .base import (Normalizer, RunningStatsNormalizer, Saved, affine_gradients,
                   cast, check_backward, momentum_factor, normalize,
                   normalize_backward, normalize_with_statistics,
                   update_running)
from .batch import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                    BatchRenorm, GhostBatchNorm)
from .per_sample import (GroupNorm, InstanceNorm, InstanceNorm1d,
                         InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)
from .sync import SyncBatchNorm
from .reparam import Reparametrization, SpectralNorm, WeightNorm

__all__ = [
    "Normalizer", "RunningStatsNormalizer", "Saved", "normalize",
    "normalize_with_statistics", "normalize_backward", "affine_gradients",
    "check_backward", "cast", "update_running", "momentum_factor",
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm",
    "GhostBatchNorm", "SyncBatchNorm", "InstanceNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
    "Reparametrization", "WeightNorm", "SpectralNorm",
]
