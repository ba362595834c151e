"""CUDA backend: every variant forward and backward on device arrays against
the CPU backend and the float64 reference.

Runs on Numba's CUDA simulator where there is no GPU (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1 there) and natively on a GPU.  The simulator runs a
Python thread per CUDA thread, so shapes are tiny and blocks small; the
launch settings are shrunk so that the multi-block splits (partials merged
across blocks) are exercised at these sizes.
"""

import os

import numpy as np
import pytest

import normkit
from conftest import (MATRIX_ARGS, assert_close_scaled, make_case, make_layer,
                      matrix, nk_backward, nk_forward, ref_backward,
                      ref_forward, with_nonfinite_groups)
from normkit import engine

cuda = pytest.importorskip("numba.cuda")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and not cuda.is_available():
    pytest.skip("no CUDA device and the simulator is off", allow_module_level=True)

from normkit.backend import cuda as _cuda  # noqa: E402  (needs numba.cuda)
from normkit.backend import plan  # noqa: E402

SMALL = dict(threads=8, min_threads=4, target_blocks=4, values_per_thread=2)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    for key, value in SMALL.items():
        monkeypatch.setattr(plan.SETTINGS, key, value)


def on_device(value):
    return cuda.to_device(value) if isinstance(value, np.ndarray) else value


def host(value):
    assert not isinstance(value, np.ndarray), "expected a device array"
    return value.copy_to_host()


def device_kwargs(case):
    return {k: on_device(v) for k, v in case.copied_kwargs().items()}


def gpu_forward(case, kwargs):
    fn = getattr(normkit, case.name)
    return fn(on_device(case.x), *case.args, **kwargs, return_saved=True)


# --------------------------------------------------------------------------
# every variant, both layouts, float32 and float16, training and inference
# --------------------------------------------------------------------------

@pytest.mark.parametrize(MATRIX_ARGS, matrix(ndims=(3,), affines=(True,),
                                             dtypes=(np.float32, np.float16))
                         + matrix(ndims=(2, 4), affines=(False,),
                                  dtypes=(np.float32,)))
def test_matches_cpu_and_reference(name, ndim, layout, mode, affine, dtype, rng):
    case = make_case(name, ndim, layout, mode, affine, dtype=dtype, rng=rng)
    (y_cpu, saved_cpu), kw_cpu = nk_forward(case, return_saved=True)
    dy = rng.normal(size=case.x.shape).astype(dtype)
    grads_cpu = nk_backward(case, dy, saved_cpu)
    y_ref, stats_ref = ref_forward(case)
    grads_ref = ref_backward(case, dy)

    kwargs = device_kwargs(case)
    y, saved = gpu_forward(case, kwargs)
    grads = getattr(normkit, name + "_backward")(on_device(dy),
                                                 on_device(case.x), saved)

    assert y.dtype == np.dtype(dtype) and y.shape == case.x.shape
    assert_close_scaled(host(y), y_cpu, dtype, what="y vs cpu")
    assert_close_scaled(host(y), y_ref, dtype, what="y vs reference")
    for key, value in stats_ref.items():
        assert_close_scaled(host(kwargs[key]), kw_cpu[key], dtype, what=key)
        assert_close_scaled(host(kwargs[key]), value, dtype, what=key)
    for what, got, cpu, ref in zip(("dx", "dweight", "dbias"), grads,
                                   grads_cpu, grads_ref):
        if cpu is None:
            assert got is None, what
            continue
        assert got.dtype == cpu.dtype and got.shape == cpu.shape, what
        factor = 1.0 if what == "dx" else 10.0
        assert_close_scaled(host(got), cpu, dtype, factor, what=f"{what} vs cpu")
        assert_close_scaled(host(got), ref, dtype, factor, what=f"{what} vs ref")


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "layer_norm"])
def test_without_affine_float64(name, rng):
    case = make_case(name, 3, "last", "train", False, dtype=np.float64, rng=rng)
    (y_cpu, saved_cpu), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=case.x.shape)
    dx_cpu, _, _ = nk_backward(case, dy, saved_cpu)
    y, saved = gpu_forward(case, device_kwargs(case))
    dx, dw, db = getattr(normkit, name + "_backward")(on_device(dy),
                                                     on_device(case.x), saved)
    assert dw is None and db is None
    assert_close_scaled(host(y), y_cpu, np.float64, what="y")
    assert_close_scaled(host(dx), dx_cpu, np.float64, what="dx")


def test_batch_renorm_corrections_stay_on_device(rng):
    """r and d are clipped on the device and saved as device arrays."""
    case = make_case("batch_renorm", 3, "first", "train", True, rng=rng,
                     rmax=1.1, dmax=0.2)
    (_, saved_cpu), _ = nk_forward(case, return_saved=True)
    _, saved = gpu_forward(case, device_kwargs(case))
    for what in ("mean", "rstd", "r", "d"):
        assert_close_scaled(host(getattr(saved, what)),
                            getattr(saved_cpu, what), np.float64, what=what)
    assert np.all(saved_cpu.r <= 1.1) and np.any(np.abs(saved_cpu.d) == 0.2)


# --------------------------------------------------------------------------
# splits across blocks: few channels over a big batch, one long row
# --------------------------------------------------------------------------

def reference_moments(x, view):
    grouped = np.moveaxis(x.astype(np.float64).reshape(view.dims), 2, 1)
    grouped = grouped.reshape(view.P, view.K, -1)
    return grouped.mean(axis=2), grouped.var(axis=2)


@pytest.mark.parametrize("shape,axis,columns", [((24, 2, 6), 1, False),
                                                ((96, 2), 1, True),
                                                ((24, 4, 2), -1, True)])
def test_few_channels_big_batch_split_across_blocks(shape, axis, columns, rng):
    x = (1e3 + rng.normal(size=shape)).astype(np.float32)
    view = engine.channel_view(shape, axis % len(shape), per_sample=False)
    grid = plan.grid_for(view)
    assert grid.columns == columns and grid.n_chunks > 1
    mean, var = _cuda.moments(cuda.to_device(x), view)
    first = host(mean), host(var)
    mean, var = _cuda.moments(cuda.to_device(x), view)
    np.testing.assert_array_equal(host(mean), first[0])   # deterministic
    np.testing.assert_array_equal(host(var), first[1])
    ref_mean, ref_var = reference_moments(x, view)
    np.testing.assert_allclose(first[0], ref_mean, rtol=1e-6)
    np.testing.assert_allclose(first[1], ref_var, rtol=1e-4)
    w = rng.uniform(0.5, 2.0, size=2)
    dy = rng.normal(size=shape).astype(np.float32)
    y_cpu, saved_cpu = normkit.batch_norm(x, weight=w, axis=axis,
                                          return_saved=True)
    grads_cpu = normkit.batch_norm_backward(dy, x, saved_cpu)
    y, saved = normkit.batch_norm(cuda.to_device(x), weight=cuda.to_device(w),
                                  axis=axis, return_saved=True)
    grads = normkit.batch_norm_backward(cuda.to_device(dy), cuda.to_device(x),
                                        saved)
    assert_close_scaled(host(y), y_cpu, np.float32, what="y")
    for what, got, expected in zip(("dx", "dweight"), grads, grads_cpu):
        assert_close_scaled(host(got), expected, np.float32, 10, what=what)


def test_one_long_row_split_across_blocks(rng):
    x = rng.normal(5.0, 0.01, size=(1, 160)).astype(np.float32)
    w = rng.uniform(0.5, 2, size=160)
    view = engine.trailing_view(x.shape, 1)
    grid = plan.grid_for(view)
    assert not grid.columns and grid.n_lch > 1
    y, saved = normkit.layer_norm(cuda.to_device(x), 160, cuda.to_device(w),
                                  return_saved=True)
    y_ref, _ = ref_forward(make_case("layer_norm", x=x, layout="last",
                                     affine=False))
    assert_close_scaled(host(y) / w, y_ref, np.float32, 10, what="y")
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, dw, _ = normkit.layer_norm_backward(cuda.to_device(dy),
                                            cuda.to_device(x), saved)
    y_cpu, saved_cpu = normkit.layer_norm(x, 160, w, return_saved=True)
    dx_cpu, dw_cpu, _ = normkit.layer_norm_backward(dy, x, saved_cpu)
    assert_close_scaled(host(dx), dx_cpu, np.float32, 10, what="dx")
    assert_close_scaled(host(dw), dw_cpu, np.float32, 10, what="dweight")


def test_strided_device_input_is_copied_once_on_the_device(rng):
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)       # (N, S, C)
    transposed = cuda.to_device(x).transpose((0, 2, 1))     # (N, C, S) view
    assert not transposed.is_c_contiguous()
    expected = normkit.batch_norm(np.transpose(x, (0, 2, 1)), training=True)
    y = normkit.batch_norm(transposed, training=True)
    assert_close_scaled(host(y), expected, np.float32, what="y")


def test_large_mean_small_spread_float32(rng):
    """No E[x^2] - E[x]^2 cancellation: mean 1e4, std 1e-2."""
    x = (1e4 + 1e-2 * rng.standard_normal((8, 3, 4))).astype(np.float32)
    view = engine.channel_view(x.shape, 1, per_sample=False)
    _, var = _cuda.moments(cuda.to_device(x), view)
    _, ref_var = reference_moments(x, view)
    np.testing.assert_allclose(host(var), ref_var, rtol=1e-3)


def test_grid_for_large_shapes_uses_many_blocks():
    """Default launch settings split few groups and long rows (no launch)."""
    settings = plan.Settings()
    bn = plan.grid_for(engine.channel_view((256, 64, 56, 56), 1, False),
                        settings)
    row = plan.grid_for(engine.trailing_view((1, 1_000_000), 1), settings)
    cl = plan.grid_for(engine.channel_view((64, 56, 56, 256), 3, False),
                        settings)
    enough = settings.target_blocks // 2     # chunks are rounded
    assert bn.blocks(1) >= enough and not bn.columns
    assert row.n_lch * row.n_ach > 1 and row.threads == settings.threads
    assert cl.columns and cl.blocks(1) >= enough


@pytest.mark.skipif(SIMULATOR, reason="full-size blocks need a real GPU")
@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "layer_norm",
                                  "group_norm", "batch_renorm"])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_default_launch_settings_on_gpu(name, layout, dtype, monkeypatch, rng):
    monkeypatch.setattr(plan, "SETTINGS", plan.Settings())
    shape = (32, 64, 28, 28) if layout == "first" else (32, 28, 28, 64)
    if name == "layer_norm":
        shape = (512, 1024)
    x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
    case = make_case(name, x=x, layout=layout, rng=rng)
    (y_cpu, saved_cpu), _ = nk_forward(case, return_saved=True)
    dy = rng.normal(size=shape).astype(dtype)
    dx_cpu = nk_backward(case, dy, saved_cpu)[0]
    y, saved = gpu_forward(case, device_kwargs(case))
    dx = getattr(normkit, name + "_backward")(on_device(dy), on_device(x),
                                              saved)[0]
    assert_close_scaled(host(y), y_cpu, dtype, what="y")
    assert_close_scaled(host(dx), dx_cpu, dtype, what="dx")


@pytest.mark.parametrize("dims", [(3, 1, 1, 16, 1), (1, 4, 3, 1, 5)])
def test_statistics_about_zero(dims, rng):
    """``centered=False`` (RMSNorm-style) moments, forward and backward
    against float64 NumPy over the grouped view."""
    view = engine.View(*dims)
    x = rng.normal(1.0, 2.0, size=view.dims)
    dy = rng.normal(size=view.dims)
    g = rng.uniform(0.5, 2.0, size=(1, 1, view.K, view.J, 1))
    axes = (1, 3, 4)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + 1e-5)
    xhat = x * rstd
    gdy = g * dy
    dx_ref = rstd * (gdy - xhat * (gdy * xhat).mean(axis=axes, keepdims=True))
    flat, flat_dy = cuda.to_device(x.reshape(-1)), cuda.to_device(dy.reshape(-1))
    zero, ms = _cuda.moments(flat, view, centered=False)
    y, _, _, _ = _cuda.normalize_batch(flat, view, centered=False)
    dx, sum_dy, sum_dy_xhat = _cuda.backward(
        flat_dy, flat, view, zero, cuda.to_device(rstd.reshape(view.P, view.K)),
        cuda.to_device(g.reshape(-1)), True, True, centered=False)
    np.testing.assert_array_equal(host(zero), 0.0)
    np.testing.assert_allclose(host(ms), 1 / rstd.reshape(view.P, view.K) ** 2
                               - 1e-5, rtol=1e-12)
    np.testing.assert_allclose(host(y), xhat.reshape(-1), rtol=1e-10)
    np.testing.assert_allclose(host(dx), dx_ref.reshape(-1), atol=1e-10)
    np.testing.assert_allclose(host(sum_dy), dy.sum(axis=(0, 1, 4)).reshape(-1),
                               atol=1e-10)
    np.testing.assert_allclose(host(sum_dy_xhat),
                               (dy * xhat).sum(axis=(0, 1, 4)).reshape(-1),
                               atol=1e-10)


@pytest.mark.parametrize("dims", [(5, 1, 1, 16, 1), (2, 6, 5, 1, 1),
                                  (1, 4, 5, 1, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_mean_square_of_nonfinite_groups_as_on_the_cpu(dims, dtype, rng):
    """Statistics about zero over groups holding infinities and NaNs: the
    mean square is ``mean(x**2)`` (+inf with an infinity, NaN with a NaN)
    on the device as on the CPU, so the forward's NaNs and values agree."""
    view = engine.View(*dims)
    x = with_nonfinite_groups(view, dtype, rng).reshape(-1)
    with np.errstate(all="ignore"):
        _, var_cpu = engine.moments(x, view, centered=False)
        y_cpu = engine.normalize_batch(x, view, centered=False)[0]
        _, var = _cuda.moments(cuda.to_device(x), view, centered=False)
        y = _cuda.normalize_batch(cuda.to_device(x), view, centered=False)[0]
    assert np.isposinf(var_cpu).any() and np.isnan(var_cpu).any()
    np.testing.assert_allclose(host(var), var_cpu, rtol=1e-5)
    assert_close_scaled(np.nan_to_num(host(y)), np.nan_to_num(y_cpu), dtype,
                        what="y")
    np.testing.assert_array_equal(np.isnan(host(y)), np.isnan(y_cpu))


@pytest.mark.skipif(SIMULATOR, reason="foreign device arrays need a GPU")
def test_torch_cuda_tensors_in_device_arrays_out(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    case = make_case("batch_norm", 4, "first", "train", True,
                     dtype=np.float32, rng=rng)
    (y_cpu, _), kw_cpu = nk_forward(case, return_saved=True)
    tensors = {k: torch.as_tensor(v, device="cuda") if isinstance(v, np.ndarray)
               else v for k, v in case.copied_kwargs().items()}
    y = normkit.batch_norm(torch.as_tensor(case.x, device="cuda"), **tensors)
    assert_close_scaled(host(y), y_cpu, np.float32, what="y")
    assert_close_scaled(tensors["running_var"].cpu().numpy(),
                        kw_cpu["running_var"], np.float32, what="in place")


# --------------------------------------------------------------------------
# layers: state follows the input, state_dict is on the host
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode", [("batch_norm", "train"),
                                       ("batch_renorm", "train"),
                                       ("instance_norm", "eval"),
                                       ("group_norm", "train")])
def test_layer_state_lives_with_its_input(name, mode, rng):
    case = make_case(name, 3, "last", mode, True, dtype=np.float32, rng=rng)
    cpu_layer, gpu_layer = make_layer(case), make_layer(case)
    dy = rng.normal(size=case.x.shape).astype(np.float32)
    y_cpu = cpu_layer(case.x)
    dx_cpu = cpu_layer.backward(dy)
    y = gpu_layer(cuda.to_device(case.x))
    dx = gpu_layer.backward(cuda.to_device(dy))
    assert_close_scaled(host(y), y_cpu, np.float32, what="y")
    assert_close_scaled(host(dx), dx_cpu, np.float32, what="dx")
    assert not isinstance(gpu_layer.weight, np.ndarray)
    for key, value in gpu_layer.grads.items():
        assert_close_scaled(host(value), cpu_layer.grads[key], np.float32, 10,
                            what=key)
    state, state_cpu = gpu_layer.state_dict(), cpu_layer.state_dict()
    assert state.keys() == state_cpu.keys()
    for key, value in state.items():
        assert isinstance(value, np.ndarray)
        assert_close_scaled(value, state_cpu[key], np.float32, what=key)
    gpu_layer.load_state_dict(state_cpu)
    assert not isinstance(gpu_layer.weight, np.ndarray)
    gpu_layer(case.x)                           # host input: state comes back
    assert isinstance(gpu_layer.weight, np.ndarray)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

def error_of(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("bad", [dict(x=np.zeros((3, 4, 5), np.int32)),
                                 dict(axis=3), dict(eps=-1.0),
                                 dict(momentum=2.0),
                                 dict(weight=np.ones(5)),
                                 dict(x=np.zeros((1, 4)))])
def test_bad_input_same_error_as_cpu(bad, rng):
    case = make_case("batch_norm", 3, "first", "train", True, rng=rng)
    kwargs = case.copied_kwargs(**{k: v for k, v in bad.items() if k != "x"})
    x = bad.get("x", case.x)
    expected = error_of(lambda: normkit.batch_norm(x, **kwargs))
    before = case.kwargs["running_mean"].copy()
    running_mean = cuda.to_device(before)
    device = {k: on_device(v) for k, v in kwargs.items()}
    device["running_mean"] = running_mean
    assert error_of(lambda: normkit.batch_norm(on_device(x), **device)) == expected
    np.testing.assert_array_equal(host(running_mean), before)


def test_mixing_host_and_device_arrays_is_an_error(rng):
    case = make_case("batch_norm", 3, "first", "train", True, rng=rng)
    with pytest.raises(TypeError, match="is a host NumPy array but x"):
        normkit.batch_norm(cuda.to_device(case.x), **case.copied_kwargs())
    _, saved = normkit.layer_norm(cuda.to_device(case.x), 5, return_saved=True)
    with pytest.raises(TypeError, match="x is a host NumPy array"):
        normkit.layer_norm_backward(case.x, case.x, saved)


# --------------------------------------------------------------------------
# schemes built on the public path run on the device with no kernel of
# their own
# --------------------------------------------------------------------------

def _rms(x, **kw):
    return normkit.rms_norm(x, x.shape[1:], **kw)


def _ghost(x, **kw):
    return normkit.ghost_batch_norm(x, 2, kw.pop("running_mean"),
                                    kw.pop("running_var"), training=True, **kw)


@pytest.mark.parametrize("forward,backward,running", [
    (_rms, normkit.rms_norm_backward, False),
    (_ghost, normkit.ghost_batch_norm_backward, True)], ids=["rms", "ghost"])
def test_schemes_on_device_match_cpu(forward, backward, running, rng):
    x = rng.normal(1.0, 2.0, size=(4, 3, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    stats = ({"running_mean": np.zeros(3), "running_var": np.ones(3)}
             if running else {})
    y, saved = forward(x, **{k: v.copy() for k, v in stats.items()},
                       return_saved=True)
    grads = backward(dy, x, saved)
    dev_stats = {k: on_device(v) for k, v in stats.items()}
    dy_dev, x_dev = on_device(dy), on_device(x)
    y_dev, saved_dev = forward(x_dev, **dev_stats, return_saved=True)
    np.testing.assert_allclose(host(y_dev), y, rtol=1e-5, atol=1e-5)
    for got, want in zip(backward(dy_dev, x_dev, saved_dev), grads):
        if want is not None:
            np.testing.assert_allclose(host(got), want, rtol=1e-4, atol=1e-5)
    if running:  # one update on each side, from the same starting values
        expected = {k: v.copy() for k, v in stats.items()}
        forward(x, **expected)
        for key, value in dev_stats.items():
            np.testing.assert_allclose(host(value), expected[key], rtol=1e-6)


@pytest.mark.parametrize("dims,fused", [((3, 1, 2, 16, 1), True),
                                        ((1, 16, 2, 1, 8), False)])
def test_normalize_batch_returns_the_factor_it_normalized_with(dims, fused,
                                                              rng):
    """``rstd`` is ``1 / sqrt(var + eps)`` per group, written by the fused
    kernel or computed after the moments, and ``y`` is ``(x - mean) *
    rstd``."""
    view = engine.View(*dims)
    assert (plan.grid_for(view).n_chunks == 1) == fused
    x = rng.normal(2.0, 3.0, size=view.dims)
    eps = 1e-3
    y, mean, var, rstd = _cuda.normalize_batch(cuda.to_device(x.reshape(-1)),
                                               view, eps=eps)
    mean, var, rstd = host(mean), host(var), host(rstd)
    assert rstd.shape == (view.P, view.K)
    np.testing.assert_allclose(rstd, 1.0 / np.sqrt(var + eps), rtol=4e-16)
    want = (x - mean[:, None, :, None, None]) * rstd[:, None, :, None, None]
    np.testing.assert_allclose(host(y), want.reshape(-1), rtol=0, atol=1e-12)
