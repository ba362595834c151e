"""Switchable Normalization (Luo, Ren, Peng, Zhang and Li 2018,
arXiv:1806.10779) as a normkit plug-in.

Each sample ``n`` and channel ``c`` of an ``(N, C, S...)`` input is
normalized with a mix of the instance, layer and batch statistics:

.. math::

    \\mu_{nc} = \\sum_k w_k \\mu^k, \\quad
    \\sigma^2_{nc} = \\sum_k w'_k \\sigma^{2,k}, \\quad
    y = \\gamma_c \\frac{x - \\mu_{nc}}{\\sqrt{\\sigma^2_{nc} + \\epsilon}}
        + \\beta_c, \\qquad k \\in \\{\\mathrm{in}, \\mathrm{ln},
        \\mathrm{bn}\\}

with ``w = softmax(mean_weight)`` and ``w' = softmax(var_weight)``, two
learnable vectors of three logits.  As in the paper, the layer and batch
statistics come from the instance ones (the mean of the means, and the
mean of the variances plus the variance of the means, over the channels
for LN and over the samples for BN), so the input is read once for them;
in inference the batch statistics are the running averages of the batch
statistics seen in training (PyTorch's update, unbiased variance).
Variances are biased, as in the paper's formulas.

The backward is hand-written: :func:`normkit.engine.backward_sums` gives,
per ``(n, c)``, the loss gradient of the mixed mean and variance; the
chain rule through the mix and the pooled statistics is per-channel
arithmetic on ``(N, C)`` arrays, and :func:`normkit.engine.dx_from_sums`
turns the gradients of the instance statistics into ``dx``.  The mixing
weights stay on the input's device as one-value arrays.
"""

import math

import numpy as np

import normkit
from normkit import View, engine
from normkit.backend import backend_for
from normkit.checks import check_channels
from normkit.schemes import cast, normalize_with_statistics


@normkit.channelwise
def softmax(logit, l0, l1, l2):
    """The softmax weight of ``logit``, one of ``(l0, l1, l2)``."""
    top = max(l0, l1, l2)
    return math.exp(logit - top) / (
        math.exp(l0 - top) + math.exp(l1 - top) + math.exp(l2 - top))


@normkit.channelwise
def add(a, b):
    """``a + b``."""
    return a + b


@normkit.channelwise(outputs=3)
def mix(m_in, m_ln, m_bn, v_in, v_ln, v_bn, a0, a1, a2, b0, b1, b2, eps):
    """The mixed mean and variance, with weights ``a`` and ``b``, and the
    inverse standard deviation."""
    var = b0 * v_in + b1 * v_ln + b2 * v_bn
    return a0 * m_in + a1 * m_ln + a2 * m_bn, var, 1.0 / math.sqrt(var + eps)


@normkit.channelwise(outputs=2)
def stat_grads(sum_g, sum_gxhat, rstd):
    """Gradients of the loss for the mixed mean and variance of a group."""
    return -rstd * sum_g, -0.5 * rstd * rstd * sum_gxhat


@normkit.channelwise(outputs=2)
def instance_sums(dmu, dvar, dm_ln, dv_ln, dm_bn, dv_bn, m_in, m_ln, m_bn,
                  rstd, a0, a1, a2, b0, b1, b2):
    """Chain rule to the instance mean and variance, as the group sums
    ``dx_from_sums`` takes: ``dx = rstd*g*dy + dm/S + 2*dv*(x - m_in)/S``."""
    dm = (a0 * dmu + a1 * dm_ln + a2 * dm_bn
          + 2.0 * (b1 * dv_ln * (m_in - m_ln) + b2 * dv_bn * (m_in - m_bn)))
    dv = b0 * dvar + b1 * dv_ln + b2 * dv_bn
    return -dm / rstd, -2.0 * dv / (rstd * rstd)


@normkit.channelwise(outputs=6)
def logit_terms(dmu, dvar, m_in, m_ln, m_bn, mu, v_in, v_ln, v_bn, var):
    """``dmu * (mu_k - mu)`` and ``dvar * (var_k - var)``: summed over
    ``(n, c)`` and times ``w_k``, the gradients of the logits."""
    return (dmu * (m_in - mu), dmu * (m_ln - mu), dmu * (m_bn - mu),
            dvar * (v_in - var), dvar * (v_ln - var), dvar * (v_bn - var))


@normkit.channelwise
def scaled(weight, mean_term, count):
    """``weight * mean_term * count``: a weight times a sum."""
    return weight * mean_term * count


def pooled(mean, var, view):
    """Mean and variance of the union of the groups of each row of view."""
    m, between = engine.moments(mean, view)
    return m, add(engine.moments(var, view)[0], between, out=between)


def statistics_views(view):
    """Views of the ``(N, C)`` instance statistics: rows (one group per
    sample, the layer statistics) and columns (one per channel, batch)."""
    return View(view.P, 1, 1, view.K, 1), View(1, view.P, view.K, 1, 1)


def entries(a):
    """The three entries of a vector of logits, as one-value arrays."""
    return a[0:1], a[1:2], a[2:3]


LOGITS = View(1, 1, 1, 3, 1)     # a vector of three logits as one group


class SwitchableNorm(normkit.RunningStatsNormalizer):
    """Switchable Normalization over channel ``axis``; ``mean_weight`` and
    ``var_weight`` are the mixing logits (ones: equal weights)."""

    state_names = normkit.RunningStatsNormalizer.state_names + (
        "mean_weight", "var_weight")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, axis=1):
        super().__init__(num_features, eps, momentum, axis=axis)
        self.mean_weight, self.var_weight = np.ones(3), np.ones(3)

    def view(self, shape):
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            min_axis=1)
        return engine.channel_view(tuple(shape), ax, per_sample=True)

    def _forward(self, x):
        view = self.view(x.shape)
        rows, cols = statistics_views(view)
        m_in, v_in = engine.moments(x, view)
        m_ln, v_ln = pooled(m_in, v_in, rows)
        if self.training:
            m_bn, v_bn = pooled(m_in, v_in, cols)
            self.update_running_stats(m_bn, v_bn, view.P * view.group_size)
        else:
            m_bn, v_bn = self.running_mean, self.running_var
        w = [softmax.over(LOGITS, l, *entries(l))
             for l in (self.mean_weight, self.var_weight)]
        mu, var, rstd = mix.over(rows, m_in, m_ln, m_bn, v_in, v_ln, v_bn,
                                 *entries(w[0]), *entries(w[1]), self.eps)
        y, saved = normalize_with_statistics(x, view, mu, rstd, self.weight,
                                             self.bias, variant=self.label)
        return y, saved.replace(batch_stats=True, extras=dict(
            m=(m_in, m_ln, m_bn), v=(v_in, v_ln, v_bn), mu=mu,
            var=var, w=w, training=self.training))

    def _backward(self, dy, x, saved):
        e, view, rstd = saved.extras, saved.view, saved.rstd
        rows, cols = statistics_views(view)
        (s0, s1), (sum_dy, sum_dyxhat) = engine.backward_sums(
            dy, x, view, saved.mean, rstd, self.weight)
        dmu, dvar = stat_grads.over(rows, s0, s1, rstd)
        d_ln = [engine.moments(d, rows)[0] for d in (dmu, dvar)]
        d_bn = ([engine.moments(d, cols)[0] for d in (dmu, dvar)]
                if e["training"] else [0.0, 0.0])       # running: constants
        sums = instance_sums.over(rows, dmu, dvar, d_ln[0], d_ln[1],
                                  *d_bn, *e["m"], rstd, *entries(e["w"][0]),
                                  *entries(e["w"][1]))
        dx = engine.dx_from_sums(dy, x, view, e["m"][0], rstd, self.weight,
                                 sums, view.group_size)
        terms = backend_for(x).empty((6, view.P, view.K), np.float64)
        logit_terms.over(rows, dmu, dvar, *e["m"], e["mu"], *e["v"],
                         e["var"], out=tuple(terms[k] for k in range(6)))
        n = view.P * view.K
        means = engine.moments(terms, View(6, 1, 1, n, 1))[0]
        grads = {"mean_weight": scaled.over(LOGITS, e["w"][0], means[:3], n),
                 "var_weight": scaled.over(LOGITS, e["w"][1], means[3:], n),
                 "weight": cast(sum_dyxhat, self.weight.shape, self.weight.dtype),
                 "bias": cast(sum_dy, self.bias.shape, self.bias.dtype)}
        return dx, grads


def reference(x, state, training, eps=1e-5, momentum=0.1, axis=1):
    """The paper's formulas in float64 NumPy, for the conformance kit:
    returns the output and the running statistics after the call."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 1)
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)
    S = x3.shape[2]
    # the three statistics, each broadcast to (N, C) for the mix
    m_in, v_in = x3.mean(axis=2), x3.var(axis=2)
    m_ln = x3.mean(axis=(1, 2))[:, None] * np.ones((1, C))
    v_ln = x3.var(axis=(1, 2))[:, None] * np.ones((1, C))
    running_mean = np.array(state["running_mean"], np.float64)
    running_var = np.array(state["running_var"], np.float64)
    if training:
        m_bn = x3.mean(axis=(0, 2))
        v_bn = x3.var(axis=(0, 2))
        running_mean = (1 - momentum) * running_mean + momentum * m_bn
        running_var = ((1 - momentum) * running_var
                       + momentum * v_bn * N * S / (N * S - 1))
    else:
        m_bn, v_bn = running_mean, running_var
    m_bn, v_bn = np.ones((N, 1)) * m_bn, np.ones((N, 1)) * v_bn

    def softmax(logits):
        e = np.exp(logits - np.max(logits))
        return e / e.sum()

    w = softmax(np.asarray(state["mean_weight"], np.float64))
    wv = softmax(np.asarray(state["var_weight"], np.float64))
    mu = w[0] * m_in + w[1] * m_ln + w[2] * m_bn
    var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
    y = (x3 - mu[:, :, None]) / np.sqrt(var[:, :, None] + eps)
    if "weight" in state:
        y = y * state["weight"][:, None] + state["bias"][:, None]
    y = np.moveaxis(y.reshape(x.shape), 1, axis)
    return y, {"running_mean": running_mean, "running_var": running_var}
