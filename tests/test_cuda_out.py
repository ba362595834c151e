"""Output buffers and launch streams on CUDA device arrays (the simulator
without a GPU): ``out=`` / ``dx_out=`` give the allocating path's results,
in place included, and every launch of the CUDA backend goes to the
stream of :func:`normkit.backend.cuda.launch_stream`."""

import os

import numpy as np
import pytest

import normkit

cuda = pytest.importorskip("numba.cuda")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and not cuda.is_available():
    pytest.skip("no CUDA device and the simulator is off", allow_module_level=True)

from normkit.backend import cuda as nk_cuda  # noqa: E402
from normkit.backend import plan  # noqa: E402

SMALL = dict(threads=8, min_threads=4, target_blocks=4, values_per_thread=2)

#: name -> (shape, forward(x, **kw), backward); running statistics are
#: device arrays made fresh for every call.
CASES = {
    "batch_norm-train": ((6, 3, 5), lambda x, **kw: normkit.batch_norm(
        x, cuda.to_device(np.zeros(3)), cuda.to_device(np.ones(3)),
        training=True, **kw), normkit.batch_norm_backward),
    "batch_norm-eval": ((6, 3, 5), lambda x, **kw: normkit.batch_norm(
        x, cuda.to_device(np.full(3, 0.5)), cuda.to_device(np.full(3, 2.0)),
        cuda.to_device(np.full(3, 1.5)), cuda.to_device(np.full(3, 0.25)),
        **kw), normkit.batch_norm_backward),
    "layer_norm": ((3, 24), lambda x, **kw: normkit.layer_norm(x, 24, **kw),
                   normkit.layer_norm_backward),
    "group_norm": ((3, 4, 5), lambda x, **kw: normkit.group_norm(x, 2, **kw),
                   normkit.group_norm_backward),
    "rms_norm": ((3, 16), lambda x, **kw: normkit.rms_norm(x, 16, **kw),
                 normkit.rms_norm_backward),
    "batch_renorm-train": ((6, 3, 5), lambda x, **kw: normkit.batch_renorm(
        x, cuda.to_device(np.full(3, 0.1)), cuda.to_device(np.full(3, 1.2)),
        training=True, **kw), normkit.batch_renorm_backward),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    for key, value in SMALL.items():
        monkeypatch.setattr(plan.SETTINGS, key, value)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_out_and_dx_out(name, dtype, rng):
    shape, forward, backward = CASES[name]
    x_host = rng.normal(1.0, 2.0, shape).astype(dtype)
    dy_host = rng.standard_normal(shape).astype(dtype)
    x, dy = cuda.to_device(x_host), cuda.to_device(dy_host)
    expected = host(forward(x))
    out = cuda.device_array(shape, dtype)
    assert forward(x, out=out) is out
    np.testing.assert_array_equal(host(out), expected)
    inplace = cuda.to_device(x_host)
    forward(inplace, out=inplace)
    np.testing.assert_array_equal(host(inplace), expected)
    _, saved = forward(x, return_saved=True)
    dx = host(first(backward(dy, x, saved)))
    dx_out = cuda.device_array(shape, dtype)
    assert first(backward(dy, x, saved, dx_out=dx_out)) is dx_out
    np.testing.assert_array_equal(host(dx_out), dx)
    backward(dy, x, saved, dx_out=dy)
    np.testing.assert_array_equal(host(dy), dx)


def test_device_layer_in_place_inference(rng):
    layer = normkit.BatchNorm1d(3).eval()
    layer.running_mean[:] = [0.5, -1.0, 2.0]
    x_host = rng.normal(1.0, 2.0, (6, 3, 5))
    expected = layer(x_host)
    x = cuda.to_device(x_host)
    assert layer(x, out=x) is x
    np.testing.assert_array_equal(host(x), expected)


def test_host_out_for_device_input_raises(rng):
    x = cuda.to_device(rng.standard_normal((4, 6)))
    with pytest.raises(TypeError, match="out is a host NumPy array"):
        normkit.layer_norm(x, 6, out=np.empty((4, 6)))
    with pytest.raises(TypeError, match="out must be a CUDA device array"):
        normkit.LayerNorm(6)(x, out=np.empty((4, 6)))
    with pytest.raises(ValueError, match="out must have x's shape"):
        normkit.layer_norm(x, 6, out=cuda.device_array((6, 4)))


@pytest.fixture
def launches(monkeypatch):
    """The stream of every kernel launch from now on (simulator only:
    its kernels take the launch configuration in ``__getitem__``)."""
    if not SIMULATOR:
        pytest.skip("records launches through the simulator's kernels")
    from numba.cuda.simulator import kernel as simulator_kernel
    seen = []
    configure = simulator_kernel.FakeCUDAKernel.__getitem__

    def recording(kernel, configuration):
        seen.append(configuration[2] if len(configuration) > 2 else None)
        return configure(kernel, configuration)

    monkeypatch.setattr(simulator_kernel.FakeCUDAKernel, "__getitem__",
                        recording)
    return seen


@pytest.mark.parametrize("name", CASES)
def test_every_launch_goes_to_the_launch_stream(name, launches, rng):
    shape, forward, backward = CASES[name]
    x_host = rng.normal(1.0, 2.0, shape)
    x, dy = cuda.to_device(x_host), cuda.to_device(rng.standard_normal(shape))
    expected_y, saved = forward(x, return_saved=True)
    expected_dx = host(first(backward(dy, x, saved)))
    assert launches and set(launches) == {0}  # the default stream
    launches.clear()
    stream = cuda.stream()
    with nk_cuda.launch_stream(stream) as entered:
        assert entered is stream and nk_cuda.current_stream() is stream
        y, saved = forward(x, return_saved=True)
        dx = first(backward(dy, x, saved))
    stream.synchronize()
    assert nk_cuda.current_stream() == 0
    assert launches and all(s is stream for s in launches), launches
    np.testing.assert_array_equal(host(y), host(expected_y))
    np.testing.assert_array_equal(host(dx), expected_dx)


def test_launch_streams_nest_and_copies_follow_them(rng):
    outer, inner = cuda.stream(), cuda.stream()
    with nk_cuda.launch_stream(outer):
        with nk_cuda.launch_stream(inner):
            assert nk_cuda.current_stream() is inner
            a = nk_cuda.to_device(np.arange(4.0))
            np.testing.assert_array_equal(nk_cuda.to_host(a), np.arange(4.0))
        assert nk_cuda.current_stream() is outer
    assert nk_cuda.current_stream() == 0


def test_device_unbatched_instance_norm_writes_out(rng):
    x = cuda.to_device(rng.standard_normal((3, 7)))
    out = cuda.device_array((3, 7))
    assert normkit.InstanceNorm1d(3)(x, out=out) is out
    np.testing.assert_array_equal(host(out), host(normkit.InstanceNorm1d(3)(x)))
