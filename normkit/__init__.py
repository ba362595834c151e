"""normkit: a research framework for normalization layers.

One Numba reduction engine (:mod:`normkit.engine`) behind BatchNorm,
LayerNorm, InstanceNorm, GroupNorm and Batch Renormalization, forward and
backward, with PyTorch's semantics.
"""

from .engine import View
from .functional import (Saved, batch_norm, batch_norm_backward, batch_renorm,
                         batch_renorm_backward, batch_renorm_schedule,
                         group_norm, group_norm_backward, instance_norm,
                         instance_norm_backward, layer_norm,
                         layer_norm_backward, normalize, normalize_backward)
from .layers import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                     BatchRenorm, GroupNorm, InstanceNorm, LayerNorm,
                     Normalizer)
from .layers import RunningStatsNormalizer
from .schemes import (GhostBatchNorm, Reparametrization, RMSNorm, SpectralNorm,
                      WeightNorm, ghost_batch_norm, ghost_batch_norm_backward,
                      rms_norm, rms_norm_backward, spectral_norm,
                      spectral_norm_backward, weight_norm,
                      weight_norm_backward)
from .population import reestimate_population_statistics
from .registry import available, create, register
from .registry import PluginWarning, refresh

__version__ = "0.1.0"

__all__ = [
    "View", "Saved", "normalize", "normalize_backward",
    "batch_norm", "batch_norm_backward", "instance_norm",
    "instance_norm_backward", "layer_norm", "layer_norm_backward",
    "group_norm", "group_norm_backward", "batch_renorm",
    "batch_renorm_backward", "batch_renorm_schedule",
    "Normalizer", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm", "LayerNorm", "GroupNorm", "BatchRenorm",
    "available", "create", "register",
    "RunningStatsNormalizer", "rms_norm", "rms_norm_backward",
    "ghost_batch_norm", "ghost_batch_norm_backward", "weight_norm",
    "weight_norm_backward", "spectral_norm", "spectral_norm_backward",
    "RMSNorm", "GhostBatchNorm", "Reparametrization", "WeightNorm",
    "SpectralNorm", "PluginWarning", "refresh",
    "reestimate_population_statistics",
]
