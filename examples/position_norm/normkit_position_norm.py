"""Positional normalization (Li, Wu, Lim, Belongie and Weinberger 2019) as a
normkit plug-in.

Each spatial position of each sample is normalized across its channels::

    y[n, :, s] = (x[n, :, s] - mu[n, s]) / sqrt(sigma[n, s]**2 + eps)

with the mean and biased variance over the ``C`` channels.  For a
channels-first input ``(N, C, S...)`` that is the engine view
``P = N, A = C, K = prod(S), J = 1, B = 1``: one statistics group per
``(n, s)``, reduced over the channels.  Declaring the view is all it takes;
normkit supplies forward, backward, train/eval and state handling.  The
entry point in ``pyproject.toml`` makes ``normkit.create("position_norm")``
find it once the package is installed.
"""

import math

import numpy as np

import normkit


class PositionNorm(normkit.Normalizer):
    """Positional normalization of channels-first ``(N, C, S...)`` input."""

    def __init__(self, eps=1e-5):
        super().__init__(param_shape=None, eps=eps)

    def view(self, shape):
        if len(shape) < 3:
            raise ValueError(f"PositionNorm: expected input (N, C, spatial...) "
                             f"with at least 3 dimensions, got shape {shape}")
        return normkit.View(P=shape[0], A=shape[1], K=math.prod(shape[2:]),
                            J=1, B=1)


def reference(x, eps=1e-5):
    """The float64 NumPy formula, for the conformance kit."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=1, keepdims=True) + eps)
