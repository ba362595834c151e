"""Train/inference mismatch and batch dependence of each variant.

Both studies feed a variant's conv normalizer (the ``conv`` builder of
``normkit.analysis.variants.VARIANTS``, features ``(N, C, H, W)``)
synthetic features: channel ``c`` is ``mu_c + sd_c * z`` with Gaussian
``z`` and per-channel ``mu_c``, ``sd_c`` drawn once per seed (the same for
every variant and batch size).  The layers
keep their initial weight 1 and bias 0, so outputs are on a unit scale and
distances are comparable across variants.

Mismatch (:func:`mismatch_study`): a layer first sees ``steps`` training
batches whose distribution drifts linearly from standard normal to the
final one over the first half of the steps (as a layer's input does while
the weights before it train), then inference statistics are obtained in
one of three ways: the exponential moving average (``momentum=0.1``), the
cumulative average (``momentum=None``), or population re-estimation over
``steps`` fresh batches of the final distribution
(:func:`normkit.reestimate_population_statistics`).  Each is used with its
variance as estimated (unbiased) and shrunk to the biased
``(m - 1) / m`` of it, ``m`` the values per channel in one batch (the
biased variance is what training-mode normalization divides by).  The
mismatch is the RMS difference between training-mode and inference-mode
outputs on the same fresh batches of the final distribution.

Batch dependence (:func:`batch_dependence`): the RMS change of one sample's
training-mode output when the rest of its batch is replaced by fresh draws,
after a warm-up of the running statistics.
"""

import copy
from dataclasses import dataclass

import numpy as np

from ..population import (has_running_statistics,
                          reestimate_population_statistics)
from ._threads import single_threaded
from .variants import VARIANTS, check_variants, row

#: Ways of obtaining inference statistics: name -> momentum while training
#: (population re-estimation trains with the default and then re-estimates).
METHODS = {"ema": 0.1, "cumulative": None, "population": 0.1}


class _Features:
    """Synthetic conv features with fixed per-channel mean and spread.

    The means and spreads depend on ``seed`` only, so every variant and
    batch size sees the same distribution; the samples come from their own
    stream, ``stream`` (a tuple of ints).
    """

    def __init__(self, shape, seed, stream):
        self.shape = tuple(shape)
        channels = np.random.default_rng(seed)
        self.mean = channels.normal(0.0, 2.0, (shape[0], 1, 1))
        self.std = channels.uniform(0.5, 2.0, (shape[0], 1, 1))
        self.rng = np.random.default_rng([seed, *stream])

    def batch(self, n, progress=1.0):
        """``n`` samples; ``progress`` in [0, 1] moves them from N(0, 1) to
        the final distribution."""
        z = self.rng.standard_normal((n,) + self.shape)
        std = 1.0 + progress * (self.std - 1.0)
        return progress * self.mean + std * z


def _rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _training_output(layer, x):
    """Training-mode output of a copy of ``layer`` (its state is kept)."""
    return copy.deepcopy(layer).train()(x)


def _summary(values):
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


@single_threaded
def mismatch_study(variants=tuple(VARIANTS), batch_sizes=(2, 4, 8, 16, 32, 64),
                   shape=(8, 4, 4), steps=200, eval_batches=20, seed=0):
    """Distance between training-mode and inference-mode outputs.

    Returns
    -------
    list of dict
        ``variant``, ``batch_size``, ``method`` (``ema``, ``cumulative``,
        ``population``; ``batch`` for variants without running statistics,
        whose inference mode uses the input's own statistics), ``variance``
        (``unbiased`` / ``biased``; ``running_std`` for BatchRenorm, whose
        running spread is a standard deviation, kept as is),
        ``mismatch`` and its standard error ``mismatch_se`` over the
        evaluation batches.
    """
    rows = []
    for v_index, variant in enumerate(check_variants(variants)):
        for batch_size in batch_sizes:
            features = _Features(shape, seed, (v_index, batch_size))
            probe = row(variant).conv(shape, batch_size)
            if probe is None or not has_running_statistics(probe):
                rows.append(_mismatch_row(variant, batch_size, "batch", "none",
                                          probe, features, eval_batches))
                continue
            for method, momentum in METHODS.items():
                layer = _trained(variant, shape, features, batch_size, steps,
                                 method, momentum)
                variances = (("running_std",) if layer.spread_name == "running_std"
                             else ("unbiased", "biased"))
                m = batch_size * int(np.prod(shape[1:]))
                for variance in variances:
                    evaluated = copy.deepcopy(layer)
                    if variance == "biased":
                        evaluated.running_var *= (m - 1) / m
                    rows.append(_mismatch_row(variant, batch_size, method,
                                              variance, evaluated, features,
                                              eval_batches))
    return rows


def _trained(variant, shape, features, batch_size, steps, method, momentum):
    """A fresh layer after ``steps`` drifting training batches (and, for
    ``population``, re-estimation over as many final-distribution ones)."""
    layer = row(variant).conv(shape, batch_size)
    layer.momentum = momentum
    for step in range(steps):
        layer(features.batch(batch_size, min(1.0, 2.0 * step / steps)))
    if method == "population":
        batches = [features.batch(batch_size) for _ in range(steps)]
        reestimate_population_statistics(layer, batches)
    return layer


def _mismatch_row(variant, batch_size, method, variance, layer, features,
                  eval_batches):
    distances = []
    for _ in range(eval_batches):
        x = features.batch(batch_size)
        if layer is None:
            distances.append(0.0)
            continue
        distances.append(_rms(_training_output(layer, x), layer.eval()(x)))
    mean, se = _summary(distances)
    return {"variant": variant, "batch_size": batch_size, "method": method,
            "variance": variance, "mismatch": mean, "mismatch_se": se}


@single_threaded
def batch_dependence(variants=tuple(VARIANTS), batch_sizes=(2, 4, 8, 16, 32, 64),
                     shape=(8, 4, 4), trials=20, warmup=100, seed=0):
    """RMS change of sample 0's training-mode output when samples
    ``1..N-1`` of its batch are replaced.

    Returns
    -------
    list of dict
        ``variant``, ``batch_size``, ``change`` (mean over ``trials``) and
        ``change_se``.  Zero by construction for per-sample normalizers;
        measured all the same.
    """
    rows = []
    for v_index, variant in enumerate(check_variants(variants)):
        for batch_size in batch_sizes:
            if batch_size < 2:
                raise ValueError(f"batch_dependence: batch sizes must be >= 2, "
                                 f"got {batch_size}")
            features = _Features(shape, seed, (v_index, batch_size))
            layer = row(variant).conv(shape, batch_size)
            changes = []
            if layer is not None:
                for _ in range(warmup):
                    layer(features.batch(batch_size))
            for _ in range(trials):
                x = features.batch(batch_size)
                replaced = x.copy()
                replaced[1:] = features.batch(batch_size - 1)
                if layer is None:
                    changes.append(0.0)
                    continue
                changes.append(_rms(_training_output(layer, x)[0],
                                    _training_output(layer, replaced)[0]))
            mean, se = _summary(changes)
            rows.append({"variant": variant, "batch_size": batch_size,
                         "change": mean, "change_se": se})
    return rows


@dataclass(frozen=True)
class StudyKernels:
    """The kernel paths of :func:`mismatch_study` and
    :func:`batch_dependence`, for
    :func:`~normkit.analysis.sweep.warm_kernel_cache`.

    ``compile`` runs both studies once at their smallest (two training
    steps, two evaluation batches, two trials) for the given variants and
    batch sizes, in their default shape, so that a process that runs them
    afterwards loads their kernels from Numba's on-disk cache instead of
    compiling them itself (such code can round differently in the last
    bits, Numba issue 10617: a first run's studies then differed from
    every later run's).
    """

    def compile(self, variants, batch_sizes):
        """Take both studies' kernel paths once."""
        mismatch_study(variants, batch_sizes, steps=2, eval_batches=2)
        batch_dependence(variants, batch_sizes, trials=2, warmup=1)
