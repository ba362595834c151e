"""EvoNorm-S0 (Liu, Brock, Simonyan and Le 2020, arXiv:2004.02967) as a
normkit plug-in.

A sample-based normalization-activation layer: a Swish-like gate divided by
the group standard deviation (GroupNorm's groups of ``C / G`` channels of
one sample, centered, biased):

.. math::

    y = \\frac{x \\, \\sigma(v_c x)}{\\sqrt{s^2_{n,g}(x) + \\epsilon}}
        \\gamma_c + \\beta_c

with learnable per-channel ``v`` (ones), ``gamma`` (``weight``, ones) and
``beta`` (``bias``, zeros).  The statistics are :func:`normkit.engine.moments`
over GroupNorm's view; the output is one :class:`~normkit.channelwise` pass
over the input.  In the backward, :func:`normkit.engine.backward_sums` over
the gated input ``u = x sigma(v x)`` gives both the parameter sums and the
gradient of each group's inverse standard deviation; one more elementwise
pass gives ``dx`` and the terms of ``dv``.
"""

import math

import numpy as np

import normkit
from normkit import engine
from normkit.backend.protocol import inverse_std
from normkit.checks import check_channels
from normkit.schemes import cast


@normkit.channelwise
def gate(x, v):
    """``u = x * sigmoid(v * x)``."""
    return x / (1.0 + math.exp(-v * x))


@normkit.channelwise
def evonorm(x, v, rstd, gamma, beta):
    return x / (1.0 + math.exp(-v * x)) * rstd * gamma + beta


@normkit.channelwise(outputs=2)
def evonorm_backward(dy, x, v, rstd, mean, sum_gu_rstd, gamma, n):
    """``dx`` and the terms of ``dv``; ``sum_gu_rstd`` is the group's
    ``sum(gamma * dy * u * rstd)``, ``n`` its size."""
    s = 1.0 / (1.0 + math.exp(-v * x))
    g = dy * gamma * rstd
    dx = g * (s + v * x * s * (1.0 - s)) - rstd * rstd * sum_gu_rstd * (x - mean) / n
    return dx, g * x * x * s * (1.0 - s)


class EvoNormS0(normkit.Normalizer):
    """EvoNorm-S0 over channel ``axis`` with ``num_groups`` groups of
    channels; state ``weight``, ``bias``, ``v``."""

    state_names = normkit.Normalizer.state_names + ("v",)

    def __init__(self, num_features, num_groups=32, eps=1e-5, axis=1):
        if num_features % num_groups:
            raise ValueError(f"EvoNormS0: num_groups must divide num_features "
                             f"{num_features}, got {num_groups}")
        super().__init__((num_features,), eps)
        self.num_features, self.num_groups, self.axis = num_features, num_groups, axis
        self.v = np.ones(num_features)

    def view(self, shape):
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            min_axis=1)
        return engine.channel_view(tuple(shape), ax, True, self.num_groups)

    def _forward(self, x):
        view = self.view(x.shape)
        mean, var = engine.moments(x, view)
        rstd = inverse_std(var, self.eps, out=var)
        y = evonorm.over(view, x, self.v, rstd, self.weight, self.bias)
        saved = normkit.schemes.Saved(self.label, view, x.shape, mean, rstd,
                                      True, self.weight, True)
        return y, saved

    def _backward(self, dy, x, saved):
        view, mean, rstd = saved.view, saved.mean, saved.rstd
        u = gate.over(view, x, self.v)
        (_, sum_gu_rstd), (dbias, dweight) = engine.backward_sums(
            dy, u, view, mean, rstd, self.weight, centered=False)
        dx, dv = evonorm_backward.over(view, dy, x, self.v, rstd, mean,
                                       sum_gu_rstd, self.weight, view.group_size)
        _, (dv, _) = engine.backward_sums(dv, x, view, mean, rstd)
        return dx, {name: cast(grad, self.v.shape, self.v.dtype) for name, grad
                    in (("weight", dweight), ("bias", dbias), ("v", dv))}


def reference(x, state, num_groups, eps=1e-5, axis=1):
    """The paper's formula in float64 NumPy, for the conformance kit."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 1)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma, beta, v = (np.asarray(state[name], np.float64).reshape(shape)
                      for name in ("weight", "bias", "v"))
    groups = x.reshape(x.shape[0], num_groups, -1)
    std = np.sqrt(groups.var(axis=2, keepdims=True) + eps)
    std = np.broadcast_to(std, groups.shape).reshape(x.shape)
    y = x / (1.0 + np.exp(-v * x)) / std * gamma + beta
    return np.moveaxis(y, 1, axis)
