"""The worked examples of docs/extending.rst (examples/filter_response_norm,
examples/switchable_norm, examples/evonorm): schemes written with normkit's
public API only.

Each passes the conformance kit against its float64 NumPy reference
(forward in training and inference, finite-difference gradients of ``x``
and of every parameter, state round trip, bad input, train/eval), and runs
forward and backward on CUDA device arrays (Numba's simulator without a
GPU), matching the CPU.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from normkit.testing import check_conformance

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
for folder in ("filter_response_norm", "switchable_norm", "evonorm"):
    if str(EXAMPLES / folder) not in sys.path:
        sys.path.insert(0, str(EXAMPLES / folder))

import normkit_evonorm as evo  # noqa: E402
import normkit_filter_response_norm as frn  # noqa: E402
import normkit_switchable_norm as sn  # noqa: E402

C = 4
SHAPES = {1: (3, C, 2, 3), -1: (3, 5, C)}      # channels first / last


def randomized(layer, seed=1):
    """``layer`` with every parameter and buffer drawn at random, so that no
    term of a gradient hides behind a one or a zero."""
    rng = np.random.default_rng(seed)
    for name, value in layer.state_dict().items():
        if value.ndim and name in ("weight", "running_var"):
            value = rng.uniform(0.5, 2.0, value.shape)
        elif value.ndim:
            value = rng.normal(0.0, 0.7, value.shape)
        setattr(layer, name, value)
    return layer


def frn_layer(axis=1):
    return randomized(frn.FilterResponseNorm(C, axis=axis))


def sn_layer(axis=1):
    return randomized(sn.SwitchableNorm(C, axis=axis))


def evo_layer(axis=1):
    return randomized(evo.EvoNormS0(C, num_groups=2, axis=axis))


def make_input(axis, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.5, 1.5, SHAPES[axis])


@pytest.mark.parametrize("axis", [1, -1])
def test_filter_response_norm_conforms(axis):
    check_conformance(lambda: frn_layer(axis), make_input(axis),
                      lambda x, state, training: frn.reference(x, state,
                                                               axis=axis))


def test_filter_response_norm_clips_at_tau():
    layer = frn_layer()
    x = make_input(1)
    y = layer(x)
    tau = layer.tau.reshape(1, C, 1, 1)
    assert np.all(y >= tau) and np.any(y == tau) and np.any(y > tau)
    layer.backward(np.ones_like(y))
    assert np.allclose(layer.grads["tau"],
                       np.sum(np.broadcast_to(tau, y.shape) == y, axis=(0, 2, 3)))


@pytest.mark.parametrize("axis", [1, -1])
def test_switchable_norm_conforms(axis):
    check_conformance(lambda: sn_layer(axis), make_input(axis),
                      lambda x, state, training: sn.reference(x, state, training,
                                                              axis=axis))


@pytest.mark.parametrize("pick", [0, 1, 2])
def test_switchable_norm_with_one_dominant_weight_is_in_ln_or_bn(pick):
    """Logits that put all weight on one statistic give IN, LN or BN."""
    x = make_input(1)
    layer = sn.SwitchableNorm(C)
    layer.mean_weight[...] = layer.var_weight[...] = -50.0
    layer.mean_weight[pick] = layer.var_weight[pick] = 50.0
    axes = [(2, 3), (1, 2, 3), (0, 2, 3)][pick]
    want = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(
        x.var(axis=axes, keepdims=True) + layer.eps)
    assert np.allclose(layer(x), want, atol=1e-10)


@pytest.mark.parametrize("axis", [1, -1])
def test_evonorm_s0_conforms(axis):
    check_conformance(lambda: evo_layer(axis), make_input(axis),
                      lambda x, state, training: evo.reference(x, state, 2,
                                                               axis=axis))


# --------------------------------------------------------------------------
# the same objects on CUDA device arrays
# --------------------------------------------------------------------------

cuda = pytest.importorskip("numba.cuda")
needs_cuda = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not cuda.is_available(),
    reason="no CUDA device and the simulator is off")


@pytest.fixture
def small_blocks(monkeypatch):
    """Simulator-sized launches that still split work across blocks."""
    from normkit.backend import plan
    for key, value in dict(threads=8, min_threads=4, target_blocks=4,
                           values_per_thread=2).items():
        monkeypatch.setattr(plan.SETTINGS, key, value)


@needs_cuda
@pytest.mark.parametrize("factory", [frn_layer, sn_layer, evo_layer],
                         ids=["filter_response_norm", "switchable_norm",
                              "evonorm_s0"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_runs_on_device_arrays_like_the_cpu(factory, mode, small_blocks):
    x = make_input(1).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    host, device = factory().train(mode == "train"), factory().train(mode == "train")
    y_host = host(x)
    dx_host = host.backward(dy)

    y = device(cuda.to_device(x))
    dx = device.backward(cuda.to_device(dy))
    for value in (y, dx, *device.grads.values()):
        assert not isinstance(value, np.ndarray), "expected a device array"
    assert y.dtype == np.float32 and dx.dtype == np.float32
    assert np.allclose(y.copy_to_host(), y_host, rtol=1e-5, atol=1e-5)
    assert np.allclose(dx.copy_to_host(), dx_host, rtol=1e-4, atol=1e-4)
    assert sorted(device.grads) == sorted(host.grads)
    for name, grad in device.grads.items():
        want = host.grads[name]
        assert grad.shape == want.shape, name
        assert np.allclose(grad.copy_to_host(), want, rtol=1e-4, atol=1e-4), name
    for name, value in host.state_dict().items():     # running statistics
        assert np.allclose(device.state_dict()[name], value, rtol=1e-6), name
