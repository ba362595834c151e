"""The normalizers the small-batch study compares: one table, one row each.

Each row of ``VARIANTS`` says how to build the normalizer that follows a
convolution (features ``(N, C, H, W)``, built from the per-sample shape
``(C, H, W)``) and the one that follows a dense layer (features ``(N, F)``,
built from ``(F,)``), given also the training batch size ``N``; a builder
returning None means no normalization there.  Adding a scheme to the study
is one row, e.g. for a registered scheme::

    "my_norm": Variant.same(
        lambda shape, batch_size: normkit.create("my_norm", ...)),

and a registered scheme (a plug-in included) needs no row at all when its
constructor's required arguments are among PyTorch's feature names
(:func:`registered`): every study accepts its name as a variant.

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
import inspect
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


#: How a registered scheme's constructor arguments are filled from the
#: per-sample feature shape and the batch size (PyTorch's names).
_ARGUMENTS = {
    "num_features": lambda shape, batch_size: shape[0],
    "num_channels": lambda shape, batch_size: shape[0],
    "num_groups": lambda shape, batch_size: math.gcd(GROUPS, shape[0]),
    "normalized_shape": lambda shape, batch_size: tuple(shape),
    "virtual_batch_size": lambda shape, batch_size: math.gcd(GHOST_BATCH,
                                                             batch_size),
}


def _required(cls):
    """Names of the arguments ``cls(...)`` cannot do without."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in parameters if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def registered(name):
    """A row for the scheme registered as ``name`` (a plug-in, or a built-in
    without a row of its own): ``normkit.create(name, ...)`` after every
    conv and dense layer, its required arguments filled by name from the
    features: ``num_features`` and ``num_channels`` are the channels
    ``C`` (features ``F``), ``num_groups`` is ``gcd(GROUPS, C)``,
    ``normalized_shape`` the per-sample shape, ``virtual_batch_size``
    ``gcd(GHOST_BATCH, N)``; other optional arguments keep their defaults.

    Raises ValueError, naming ``name``, for a scheme that needs another
    argument (Weight and Spectral Normalization reparametrize a weight and
    need its shape: they are not feature normalizers).
    """
    from normkit import registry
    cls = registry._schemes()[name]
    required = _required(cls)
    unknown = (["(unreadable signature)"] if required is None
               else [arg for arg in required if arg not in _ARGUMENTS])
    if unknown:
        raise ValueError(
            f"variant {name!r}: a registered scheme whose constructor needs "
            f"{', '.join(unknown)}; the studies can fill only "
            f"{', '.join(_ARGUMENTS)} (see normkit.analysis.variants)")

    def build(shape, batch_size):
        return normkit.create(name, **{arg: _ARGUMENTS[arg](shape, batch_size)
                                       for arg in required})
    return Variant.same(build)


def row(name):
    """The :class:`Variant` of ``name``: its row of :data:`VARIANTS`, else
    :func:`registered` for a scheme of :func:`normkit.available`."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in normkit.available():
        return registered(name)
    raise ValueError(f"unknown variant {name!r}; choose from "
                     f"{', '.join(_choices())}")


def _choices():
    """Rows of :data:`VARIANTS`, then registered schemes they can build."""
    from normkit import registry
    return list(VARIANTS) + [
        name for name, cls in registry._schemes().items()
        if name not in VARIANTS
        and all(arg in _ARGUMENTS for arg in _required(cls) or ["?"])]


def check_variants(names):
    """Return ``names`` as a tuple, or raise ValueError naming the unknown
    (rows of :data:`VARIANTS` and registered schemes are known: see
    :func:`row`)."""
    names = tuple(names)
    unknown = [name for name in names
               if name not in VARIANTS and name not in normkit.available()]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(_choices())}")
    for name in names:
        row(name)        # a registered scheme the studies cannot build
    return names
