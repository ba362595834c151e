"""Parity of RMSNorm, Weight and Spectral Normalization with PyTorch
(forward and autograd), where torch is installed."""

import numpy as np
import pytest

import normkit

torch = pytest.importorskip("torch")


def _data(shape, seed, loc=0.5):
    return loc + np.random.default_rng(seed).standard_normal(shape)


def _autograd(function, inputs, dy):
    """torch output and gradients of ``sum(function(*inputs) * dy)``."""
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    out = function(*tensors)
    out.backward(torch.tensor(dy))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("shape, normalized", [((4, 6), (6,)), ((2, 3, 4, 5), (4, 5))])
def test_rms_norm_matches_torch(shape, normalized, eps):
    x, dy = _data(shape, 0), _data(shape, 1)
    w = _data(normalized, 2, loc=1.0)
    for dtype in (np.float32, np.float64):
        y, saved = normkit.rms_norm(x.astype(dtype), normalized, w.astype(dtype),
                                    eps, return_saved=True)
        dx, dw = normkit.rms_norm_backward(dy.astype(dtype), x.astype(dtype), saved)
        ty, (tdx, tdw) = _autograd(
            lambda a, b: torch.nn.functional.rms_norm(a, normalized, b, eps),
            [x.astype(dtype), w.astype(dtype)], dy.astype(dtype))
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for got, want in ((y, ty), (dx, tdx), (dw, tdw)):
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape, axis", [((5, 7), 0), ((4, 3, 3, 3), 0), ((6, 8), 1)])
def test_weight_norm_matches_torch(shape, axis):
    v, dw = _data(shape, 3), _data(shape, 4)
    g = _data((shape[axis],), 5, loc=1.0)
    w, saved = normkit.weight_norm(v, g, axis, return_saved=True)
    dv, dg = normkit.weight_norm_backward(dw, v, saved)
    g_shape = [1] * len(shape)
    g_shape[axis] = shape[axis]
    tw, (tdv, tdg) = _autograd(lambda a, b: torch._weight_norm(a, b.reshape(g_shape), axis),
                               [v, g], dw)
    for got, want in ((w, tw), (dv, tdv), (dg, tdg)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_spectral_norm_matches_torch_parametrization():
    """Inference forward and gradient with the same u and v as torch's
    ``parametrizations.spectral_norm``; in training both update them by
    power iteration (torch computes u from v first, the paper and normkit
    v from u first, so the vectors after a step are not compared)."""
    conv = torch.nn.Conv2d(3, 5, 2, dtype=torch.float64)
    torch.nn.utils.parametrizations.spectral_norm(conv)
    conv.train()
    conv.parametrizations.weight.original.data = torch.tensor(_data((5, 3, 2, 2), 6))
    for _ in range(3):
        conv.weight                      # a few power iterations in torch
    conv.eval()
    param = conv.parametrizations.weight[0]
    layer = normkit.SpectralNorm((5, 3, 2, 2)).eval()
    layer.load_state_dict({"u": param._u.numpy(), "v": param._v.numpy()})
    raw = conv.parametrizations.weight.original
    dy = _data((5, 3, 2, 2), 7)
    w_torch = conv.weight
    w_torch.backward(torch.tensor(dy))
    w = layer(raw.detach().numpy())
    np.testing.assert_allclose(w, w_torch.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), raw.grad.numpy(), rtol=1e-10,
                               atol=1e-12)
