"""The normalizers the small-batch study compares: one table, one row each.

Each row of ``VARIANTS`` says how to build the normalizer that follows a
convolution (features ``(N, C, H, W)``, built from the per-sample shape
``(C, H, W)``) and the one that follows a dense layer (features ``(N, F)``,
built from ``(F,)``), given also the training batch size ``N``; a builder
returning None means no normalization there.  Adding a scheme to the study
is one row, e.g. for a registered scheme::

    "my_norm": Variant.same(
        lambda shape, batch_size: normkit.create("my_norm", ...)),

Ghost BatchNorm normalizes virtual batches of ``gcd(GHOST_BATCH, N)``
samples: the whole batch up to :data:`GHOST_BATCH` (where it is BatchNorm),
ghost batches of :data:`GHOST_BATCH` in larger batches, the regime of
Hoffer et al. (2017).

Batch Renormalization uses the ``(rmax, dmax)`` schedule of Ioffe (2017)
with the paper's step counts (plain BatchNorm for 5k steps, ``dmax``
reaching 5 at 25k and ``rmax`` reaching 3 at 40k) read as fractions of a
100k-step run and scaled to the run's own length (:func:`renorm_schedule`),
so a short run at batch 64 and a long one at batch 2 relax it alike.
"""

from dataclasses import dataclass
import math
from typing import Callable

import normkit

#: Groups of GroupNorm (channels or features per group: C / GROUPS).
GROUPS = 4

#: Samples per virtual batch of Ghost BatchNorm in batches larger than it.
GHOST_BATCH = 8

#: The paper's schedule points as fractions of a 100k-step run.
RENORM_WARMUP, RENORM_DMAX_AT, RENORM_RMAX_AT = 0.05, 0.25, 0.40


@dataclass(frozen=True)
class Variant:
    """How to normalize conv and dense features; see the module docstring.

    Attributes
    ----------
    conv, dense : callable
        ``builder(shape, batch_size) -> layer or None``, with ``shape`` the
        per-sample feature shape, ``(C, H, W)`` or ``(F,)``, and
        ``batch_size`` the training batch size.
    schedule : callable, optional
        ``schedule(step, total_steps) -> {attribute: value}`` set on every
        layer of the variant before each training step.
    """

    conv: Callable
    dense: Callable
    schedule: Callable | None = None

    @classmethod
    def same(cls, builder, schedule=None):
        """A row whose conv and dense normalizers come from one builder."""
        return cls(builder, builder, schedule)


def renorm_schedule(step, total_steps):
    """Batch Renormalization's ``rmax`` and ``dmax`` at ``step`` of
    ``total_steps``: :func:`normkit.batch_renorm_schedule` with its step
    counts scaled from a 100k-step run to ``total_steps``."""
    rmax, dmax = normkit.batch_renorm_schedule(
        step, warmup=RENORM_WARMUP * total_steps,
        rmax_step=RENORM_RMAX_AT * total_steps,
        dmax_step=RENORM_DMAX_AT * total_steps)
    return {"rmax": rmax, "dmax": dmax}


def _no_norm(shape, batch_size):
    return None


VARIANTS = {
    "none": Variant.same(_no_norm),
    "batch_norm": Variant.same(
        lambda shape, batch_size: normkit.BatchNorm(shape[0])),
    "batch_renorm": Variant.same(
        lambda shape, batch_size: normkit.BatchRenorm(shape[0]), renorm_schedule),
    "group_norm": Variant.same(
        lambda shape, batch_size: normkit.GroupNorm(GROUPS, shape[0])),
    "layer_norm": Variant.same(
        lambda shape, batch_size: normkit.LayerNorm(shape)),
    # a dense feature has no spatial extent to normalize an instance over
    "instance_norm": Variant(
        lambda shape, batch_size: normkit.InstanceNorm(shape[0], affine=True),
        _no_norm),
    "rms_norm": Variant.same(lambda shape, batch_size: normkit.RMSNorm(shape)),
    "ghost_batch_norm": Variant.same(
        lambda shape, batch_size: normkit.GhostBatchNorm(
            shape[0], virtual_batch_size=math.gcd(GHOST_BATCH, batch_size))),
}


def check_variants(names):
    """Return ``names`` as a tuple, or raise ValueError naming the unknown."""
    names = tuple(names)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(VARIANTS)}")
    return names
