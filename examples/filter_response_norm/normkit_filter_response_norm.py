"""Filter Response Normalization with a Thresholded Linear Unit (Singh and
Krishnan 2019, arXiv:1911.09737) as a normkit plug-in.

Per sample ``n`` and channel ``c``, with the mean square over the spatial
positions ``s`` (no centering):

.. math::

    \\nu^2_{nc} = \\frac{1}{S} \\sum_s x_{ncs}^2, \\qquad
    y_{ncs} = \\max\\Big(\\gamma_c \\frac{x_{ncs}}{\\sqrt{\\nu^2_{nc} +
              \\epsilon}} + \\beta_c, \\; \\tau_c\\Big)

with learnable ``gamma`` (``weight``), ``beta`` (``bias``) and the TLU's
threshold ``tau``.  The normalization is normkit's root-mean-square
normalization (``centered=False``) over the instance view; the TLU is a
:class:`~normkit.backend.protocol.channelwise` post-op over that view.  In
the backward the TLU routes each ``dy`` either to the normalization (where
it passed its input on) or to ``tau`` (where it clipped): the first part
goes through :func:`~normkit.normalize_backward`, the second is summed per
channel.  The same code runs on NumPy arrays and CUDA device arrays.
"""

import numpy as np

import normkit
from normkit import engine
from normkit.checks import check_channels
from normkit.schemes import cast, normalize, normalize_backward


@normkit.channelwise
def tlu(z, tau):
    """Thresholded linear unit ``max(z, tau)``."""
    return max(z, tau)


@normkit.channelwise(outputs=2)
def tlu_backward(dy, z, tau):
    """``dy`` split into its part for ``z`` (where ``z >= tau``) and for
    ``tau`` (elsewhere)."""
    return (dy, 0.0) if z >= tau else (0.0, dy)


class FilterResponseNorm(normkit.Normalizer):
    """FRN + TLU over channel ``axis`` (1: ``(N, C, S...)``, -1: channels
    last) of ``num_features`` channels; state ``weight``, ``bias``, ``tau``."""

    state_names = normkit.Normalizer.state_names + ("tau",)

    def __init__(self, num_features, eps=1e-6, axis=1):
        super().__init__((num_features,), eps)
        self.num_features, self.axis = num_features, axis
        self.tau = np.zeros(num_features)

    def view(self, shape):
        ax = check_channels(self.label, shape, self.axis, self.num_features,
                            min_axis=1)
        return engine.channel_view(tuple(shape), ax, per_sample=True)

    def _forward(self, x):
        view = self.view(x.shape)
        z, saved = normalize(x, view, self.weight, self.bias, self.eps,
                             return_saved=True, variant=self.label,
                             centered=False)
        return tlu.over(view, z, self.tau), saved.replace(extras={"z": z})

    def _backward(self, dy, x, saved):
        dz, dtau = tlu_backward.over(saved.view, dy, saved.extras["z"],
                                     self.tau)
        _, (dtau, _) = engine.backward_sums(dtau, x, saved.view, saved.mean,
                                            saved.rstd, centered=False)
        dx, dweight, dbias = normalize_backward(dz, x, saved)
        return dx, {"weight": dweight, "bias": dbias,
                    "tau": cast(dtau, self.tau.shape, self.tau.dtype)}


def reference(x, state, eps=1e-6, axis=1):
    """The paper's formulas in float64 NumPy, for the conformance kit:
    ``state`` holds ``weight``, ``bias`` and ``tau``."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 1)
    spatial = tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * len(spatial)
    gamma, beta, tau = (np.asarray(state[name], np.float64).reshape(shape)
                        for name in ("weight", "bias", "tau"))
    nu2 = np.mean(x ** 2, axis=spatial, keepdims=True)
    y = np.maximum(gamma * x / np.sqrt(nu2 + eps) + beta, tau)
    return np.moveaxis(y, 1, axis)
