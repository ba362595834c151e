"""normkit: a research framework for normalization layers.

One set of reductions (:mod:`normkit.engine`, on the CPU and CUDA backends
of :mod:`normkit.backend`) behind every scheme of :mod:`normkit.schemes`:
BatchNorm, LayerNorm, InstanceNorm, GroupNorm, Batch Renormalization,
RMSNorm, Ghost BatchNorm, Weight and Spectral Normalization, forward and
backward, with PyTorch's semantics, and the same extension API for yours.
"""

from . import distributed, engine
from .backend import channelwise
from .view import View
from .functional import (Saved, batch_norm, batch_norm_backward, batch_renorm,
                         batch_renorm_backward, batch_renorm_schedule,
                         ghost_batch_norm, ghost_batch_norm_backward,
                         group_norm, group_norm_backward, instance_norm,
                         instance_norm_backward, layer_norm,
                         layer_norm_backward, normalize, normalize_backward,
                         rms_norm, rms_norm_backward, spectral_norm,
                         spectral_norm_backward, weight_norm,
                         weight_norm_backward)
from .schemes import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                      BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm,
                      InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                      LayerNorm, Normalizer, Reparametrization, RMSNorm,
                      RunningStatsNormalizer, SpectralNorm, SyncBatchNorm,
                      WeightNorm,
                      normalize_with_statistics, update_running)
from .fold import fold_batch_norm_weights
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
    "reestimate_population_statistics", "normalize_with_statistics",
    "update_running", "channelwise", "SyncBatchNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "fold_batch_norm_weights",
]
