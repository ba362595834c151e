"""The backend protocol on CUDA device arrays (the simulator without a GPU):
the same partials, backward sums, dx from sums and channelwise arithmetic
as the CPU backend."""

import os

import numpy as np
import pytest

import normkit
from normkit import engine
from normkit.view import channel_view, trailing_view

cuda = pytest.importorskip("numba.cuda")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and not cuda.is_available():
    pytest.skip("no CUDA device and the simulator is off", allow_module_level=True)

from normkit.backend import plan  # noqa: E402

SMALL = dict(threads=8, min_threads=4, target_blocks=4, values_per_thread=2)
VIEWS = {"bn-first": lambda: ((6, 3, 5), channel_view((6, 3, 5), 1, False)),
         "bn-last": lambda: ((6, 5, 3), channel_view((6, 5, 3), 2, False)),
         "gn": lambda: ((3, 4, 5), channel_view((3, 4, 5), 1, True, 2)),
         "ln": lambda: ((3, 24), trailing_view((3, 24), 1))}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    for key, value in SMALL.items():
        monkeypatch.setattr(plan.SETTINGS, key, value)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


@pytest.mark.parametrize("name", VIEWS)
def test_partials_merge_like_the_cpu(name, rng):
    shape, view = VIEWS[name]()
    x = rng.normal(3.0, 2.0, shape)
    part = engine.moment_partials(cuda.to_device(x), view)
    mean, var = engine.merge_partials(part)
    ref_mean, ref_var = engine.moments(x, view)
    np.testing.assert_allclose(host(mean), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(host(var), ref_var, rtol=1e-10)
    np.testing.assert_array_equal(host(part)[..., 0].sum(axis=1), view.group_size)


@normkit.channelwise(outputs=3)
def _floored(mean, var, floor, shift):
    factor = 1.0 / max(var, floor) ** 0.5
    return mean - shift, factor, var


@pytest.mark.parametrize("name", VIEWS)
def test_normalize_transformed_matches_the_cpu(name, rng):
    shape, view = VIEWS[name]()
    x = rng.normal(3.0, 2.0, shape)
    gamma = rng.normal(1.0, 0.5, view.K * view.J)
    beta = rng.normal(0.0, 0.5, view.K * view.J)
    shift = rng.normal(0.0, 1.0, view.P * view.K)
    want = engine.normalize_transformed(x, view, _floored, (4.0, shift),
                                        gamma, beta)
    got = engine.normalize_transformed(
        cuda.to_device(x), view, _floored, (4.0, cuda.to_device(shift)),
        cuda.to_device(gamma), cuda.to_device(beta))
    np.testing.assert_allclose(host(got[0]), want[0], rtol=1e-12, atol=1e-12)
    for got_stat, want_stat in zip((*got[1:3], *got[3]), (*want[1:3], *want[3])):
        assert host(got_stat).shape == (view.P, view.K)
        np.testing.assert_allclose(host(got_stat), want_stat, rtol=1e-10)
    with pytest.raises(TypeError, match="same side"):
        engine.normalize_transformed(cuda.to_device(x), view, _floored,
                                     (4.0, shift))


@pytest.mark.parametrize("name", VIEWS)
@pytest.mark.parametrize("centered", [True, False])
def test_backward_sums_and_dx_from_sums_match_the_cpu(name, centered, rng):
    shape, view = VIEWS[name]()
    x = rng.normal(1.0, 2.0, shape)
    dy = rng.standard_normal(shape)
    gscale = rng.uniform(0.5, 2.0, view.K * view.J)
    mean, var = engine.moments(x, view, centered)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    group, affine = engine.backward_sums(dy, x, view, mean, rstd, gscale, centered)
    dx = engine.dx_from_sums(dy, x, view, mean, rstd, gscale, group,
                             view.group_size, centered)
    dev = [cuda.to_device(a) for a in (dy, x, mean, rstd, gscale)]
    group_d, affine_d = engine.backward_sums(dev[0], dev[1], view, *dev[2:], centered)
    dx_d = engine.dx_from_sums(dev[0], dev[1], view, *dev[2:], group_d,
                               view.group_size, centered)
    for got, want in zip(group_d + affine_d, group + affine):
        np.testing.assert_allclose(host(got), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(dx_d), dx, rtol=1e-10, atol=1e-12)


@normkit.channelwise(outputs=2)
def scale_and_shift(mean, var, eps):
    """Per-channel arithmetic compiled for the device."""
    rstd = 1.0 / (var + eps) ** 0.5
    return rstd, -mean * rstd


@normkit.channelwise
def affine_floor(y, gain, shift, floor):
    """An elementwise post-op with per-channel and per-group arguments."""
    return max(y * gain + shift, floor)


def test_channelwise_runs_on_device_arrays(rng):
    mean, var = rng.standard_normal(5), rng.uniform(0.5, 2.0, 5)
    rstd, shift = scale_and_shift(cuda.to_device(mean), cuda.to_device(var), 1e-5)
    np.testing.assert_allclose(host(rstd), 1.0 / np.sqrt(var + 1e-5))
    np.testing.assert_allclose(host(shift), -mean / np.sqrt(var + 1e-5))
    out = cuda.to_device(np.zeros(5, np.float32))
    scale_and_shift(cuda.to_device(mean), cuda.to_device(var), 0.0,
                    out=(out, cuda.to_device(np.zeros(5))))
    np.testing.assert_allclose(host(out), 1.0 / np.sqrt(var), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_channelwise_over_matches_the_cpu_on_device(dtype, rng):
    x = rng.standard_normal((2, 3, 4)).astype(dtype)
    view = channel_view(x.shape, 1, per_sample=True)
    gain, shift = rng.uniform(0.5, 2.0, 3), rng.standard_normal((2, 3))
    expected = affine_floor.over(view, x, gain, shift, -0.5)
    got = affine_floor.over(view, cuda.to_device(x), cuda.to_device(gain),
                            cuda.to_device(shift), -0.5)
    assert host(got).dtype == dtype
    np.testing.assert_allclose(host(got).astype(np.float64),
                               expected.astype(np.float64), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["ln", "bn-last"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_backward_writes_affine_out_on_device_like_the_cpu(name, dtype, rng):
    """``affine_out`` on the device receives the affine sums in its dtype,
    as on the host; a host array among device ones raises."""
    shape, view = VIEWS[name]()
    x = rng.normal(1.0, 2.0, shape)
    dy = rng.standard_normal(shape)
    mean, var = engine.moments(x, view)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    kj = view.K * view.J
    want = engine.backward(dy, x, view, mean, rstd, affine_out=(
        np.zeros(kj, dtype), np.zeros((1, kj), dtype)))
    out = (cuda.to_device(np.zeros(kj, dtype)),
           cuda.to_device(np.zeros((1, kj), dtype)))
    got = engine.backward(cuda.to_device(dy), cuda.to_device(x), view,
                          cuda.to_device(mean), cuda.to_device(rstd),
                          affine_out=out)
    np.testing.assert_allclose(host(got[0]), want[0], rtol=1e-10, atol=1e-12)
    rtol = 2e-3 if dtype == np.float16 else 1e-6
    for g, w in zip(got[1:], want[1:]):
        assert host(g).dtype == dtype and host(g).shape == w.shape
        np.testing.assert_allclose(host(g).astype(np.float64),
                                   w.astype(np.float64), rtol=rtol, atol=rtol)
    with pytest.raises(TypeError, match="host NumPy array"):
        engine.backward(cuda.to_device(dy), cuda.to_device(x), view,
                        cuda.to_device(mean), cuda.to_device(rstd),
                        affine_out=(out[0], np.zeros(kj, dtype)))


def test_layer_gradients_written_on_device_match_the_host(rng, monkeypatch):
    """The layers' path that has the backend write the parameters'
    gradients (``affine_out``, forced for small parameters here) on device
    arrays: same values, dtypes and shapes as on the host."""
    import normkit.schemes.base as base
    monkeypatch.setattr(base, "DIRECT_GRADIENTS", 1)
    x = rng.normal(1.0, 2.0, (3, 2, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, (2, 8)).astype(np.float32)
    b = rng.standard_normal((2, 8)).astype(np.float32)
    _, saved = normkit.layer_norm(x, (2, 8), w, b, return_saved=True)
    want = normkit.layer_norm_backward(dy, x, saved)
    _, saved_d = normkit.layer_norm(cuda.to_device(x), (2, 8), cuda.to_device(w),
                                    cuda.to_device(b), return_saved=True)
    got = normkit.layer_norm_backward(cuda.to_device(dy), cuda.to_device(x),
                                      saved_d)
    for g, h in zip(got, want):
        assert host(g).dtype == h.dtype and host(g).shape == h.shape
        np.testing.assert_allclose(host(g), h, rtol=1e-5, atol=1e-5)
