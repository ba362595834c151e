"""asv suites of the CUDA backend: time, bandwidth against a device copy, and
the ratio to torch CUDA.

Every variant's training forward and forward+backward on device arrays, on
the shapes of the issue: conv-style ``(64, 256, 56, 56)`` channels-first and
its channels-last twin ``(64, 56, 56, 256)`` (axis -1), float32 and float16,
and LayerNorm over ``(16384, 4096)``.

- :class:`Forward`, :class:`ForwardBackward`: ``time_*`` (each ends with a
  device synchronize, so asv times the kernels, not their launch).
- :class:`Bandwidth`: effective bandwidth as a fraction of a device-to-device
  copy of the same array measured in the same run (above 1 is impossible;
  target: forward >= 0.7).  Traffic counts reading ``x`` and writing ``y``
  for the forward, and also reading ``dy`` and ``x`` and writing ``dx`` for
  forward+backward.
- :class:`TorchRatio`: torch CUDA time over normkit time (above 1: normkit
  is faster), when torch with CUDA is installed.

Needs numba-cuda and an NVIDIA GPU; elsewhere (CPU-only CI running
``asv check``) every ``setup`` raises ``NotImplementedError`` and asv
reports the benchmarks as skipped.  ``NORMKIT_GPU_BENCH_TINY=1`` swaps in
tiny shapes so that the logic can run end to end on Numba's CUDA simulator.

Without asv, ``python benchmarks/gpu_suites.py`` prints every number as a
table (``benchmarks/gpu_check.sh`` runs it).
"""

import argparse
import os
import statistics
import time

import numpy as np

import normkit
from normkit import _bench
from normkit._bench import Case

TINY = os.environ.get("NORMKIT_GPU_BENCH_TINY") == "1"

#: The configurations, by name: (variant, shape, channel axis).
CASES = {
    f"{variant}-{layout}": (variant, shape, axis)
    for variant in ("batch_norm", "instance_norm", "group_norm", "batch_renorm")
    for layout, shape, axis in (
        ("first", (2, 8, 3, 3) if TINY else (64, 256, 56, 56), 1),
        ("last", (2, 3, 3, 8) if TINY else (64, 56, 56, 256), -1))
}
CASES["layer_norm-rows"] = ("layer_norm", (4, 16) if TINY else (16384, 4096), -1)

DTYPES = ("float32", "float16")

#: Values moved, in units of the array's size: read x, write y; then also
#: read dy and x, write dx.
FORWARD_TRAFFIC = 2
FORWARD_BACKWARD_TRAFFIC = 5

#: Timed runs per measurement of the Bandwidth and TorchRatio suites (the
#: tiny shapes only check that the logic runs).
REPEAT = 2 if TINY else 10


def cuda_module():
    """``numba.cuda`` when it can run the benchmarks.

    Raises
    ------
    NotImplementedError
        Without numba-cuda or a GPU, or on the simulator without tiny shapes.
    """
    try:
        from numba import cuda
    except ImportError as error:
        raise NotImplementedError(f"numba-cuda is not installed: {error}")
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if simulator and not TINY:
        raise NotImplementedError("the CUDA simulator runs only the tiny "
                                  "shapes (NORMKIT_GPU_BENCH_TINY=1)")
    if not cuda.is_available():
        raise NotImplementedError("no CUDA GPU available")
    return cuda


class DeviceCase:
    """Inputs of one configuration on the device, and its timed callables."""

    def __init__(self, name, dtype):
        cuda = self.cuda = cuda_module()
        variant, shape, axis = CASES[name]
        groups = 2 if TINY else 32
        self.case = Case(variant, shape, axis, dtype, groups)
        host = _bench.make_inputs(self.case)
        self.host = host
        self.x = cuda.to_device(host.x)
        self.dy = cuda.to_device(host.dy)
        self.kwargs = {k: cuda.to_device(v) if isinstance(v, np.ndarray) else v
                       for k, v in host.kwargs.items()}
        self.copy_out = cuda.device_array_like(self.x)
        self.function = getattr(normkit, variant)
        self.backward = getattr(normkit, variant + "_backward")
        for fn in (self.forward, self.forward_backward, self.copy):
            fn()                                   # compile, allocate

    def copy(self):
        """Device-to-device copy of ``x`` (the bandwidth yardstick)."""
        self.copy_out.copy_to_device(self.x)
        self.cuda.synchronize()

    def forward(self):
        self.function(self.x, **self.kwargs)
        self.cuda.synchronize()

    def forward_backward(self):
        _, saved = self.function(self.x, **self.kwargs, return_saved=True)
        self.backward(self.dy, self.x, saved)
        self.cuda.synchronize()

    def torch_pair(self):
        """torch CUDA ``(forward, forward_backward)``, synchronized.

        Raises
        ------
        NotImplementedError
            Without torch with CUDA, or for a variant torch lacks.
        """
        torch = _bench.torch
        if torch is None or not torch.cuda.is_available():
            raise NotImplementedError("torch with CUDA is not installed")
        pair = _bench.torch_callables(self.case, self.host, device="cuda")
        if pair is None:
            raise NotImplementedError(f"torch has no {self.case.variant}")

        def synchronized(fn):
            def call():
                fn()
                torch.cuda.synchronize()
            call()
            return call
        return tuple(synchronized(fn) for fn in pair)


def median_seconds(fn, repeat=REPEAT):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Suite:
    params = [list(CASES), list(DTYPES)]
    param_names = ["case", "dtype"]

    def setup(self, name, dtype):
        self.device_case = DeviceCase(name, dtype)


class Forward(_Suite):
    def time_forward(self, name, dtype):
        self.device_case.forward()


class ForwardBackward(_Suite):
    def time_forward_backward(self, name, dtype):
        self.device_case.forward_backward()


class Bandwidth(_Suite):
    """Effective bandwidth over a device copy's, measured in the same run."""

    def setup(self, name, dtype):
        super().setup(name, dtype)
        c = self.device_case
        self.copy_s = median_seconds(c.copy)
        self.forward_s = median_seconds(c.forward)
        self.forward_backward_s = median_seconds(c.forward_backward)

    def track_forward_fraction_of_copy(self, name, dtype):
        return FORWARD_TRAFFIC / 2 * self.copy_s / self.forward_s

    def track_forward_backward_fraction_of_copy(self, name, dtype):
        return FORWARD_BACKWARD_TRAFFIC / 2 * self.copy_s / self.forward_backward_s

    track_forward_fraction_of_copy.unit = "fraction"
    track_forward_backward_fraction_of_copy.unit = "fraction"


class TorchRatio(_Suite):
    """torch CUDA time over normkit time (above 1: normkit is faster)."""

    def setup(self, name, dtype):
        super().setup(name, dtype)
        c = self.device_case
        torch_forward, torch_forward_backward = c.torch_pair()
        self.forward = median_seconds(torch_forward) / median_seconds(c.forward)
        self.forward_backward = (median_seconds(torch_forward_backward)
                                 / median_seconds(c.forward_backward))

    def track_forward_speedup(self, name, dtype):
        return self.forward

    def track_forward_backward_speedup(self, name, dtype):
        return self.forward_backward

    track_forward_speedup.unit = "ratio"
    track_forward_backward_speedup.unit = "ratio"


def table(repeat=REPEAT):
    """Every configuration's numbers as a text table; a configuration that
    fails shows its error in place of its numbers."""
    headers = ["case", "dtype", "copy ms", "fwd ms", "fwd+bwd ms",
               "fwd/copy bw", "fwd+bwd/copy bw", "torch fwd x",
               "torch fwd+bwd x"]
    rows = []
    for name in CASES:
        for dtype in DTYPES:
            try:
                rows.append([name, dtype, *_row(DeviceCase(name, dtype),
                                                repeat)])
            except Exception as error:  # report it, go on with the others
                rows.append([name, dtype, f"{type(error).__name__}: {error}"]
                            + [""] * (len(headers) - 3))
    return _bench.format_table(headers, rows)


def _row(c, repeat):
    """The timing cells of one :class:`DeviceCase`."""
    copy_s, fwd, fb = (median_seconds(f, repeat)
                       for f in (c.copy, c.forward, c.forward_backward))
    ratios = ["-", "-"]
    try:
        torch_fwd, torch_fb = c.torch_pair()
    except NotImplementedError:
        pass
    else:
        ratios = [f"{median_seconds(torch_fwd, repeat) / fwd:.2f}",
                  f"{median_seconds(torch_fb, repeat) / fb:.2f}"]
    return [f"{copy_s * 1e3:.3f}", f"{fwd * 1e3:.3f}", f"{fb * 1e3:.3f}",
            f"{FORWARD_TRAFFIC / 2 * copy_s / fwd:.2f}",
            f"{FORWARD_BACKWARD_TRAFFIC / 2 * copy_s / fb:.2f}", *ratios]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=REPEAT)
    args = parser.parse_args(argv)
    cuda = cuda_module()
    device = cuda.get_current_device()
    print(f"device: {getattr(device, 'name', 'CUDA simulator')}")
    print(table(args.repeat))


if __name__ == "__main__":
    main()
