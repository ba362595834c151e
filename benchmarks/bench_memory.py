"""asv suite: memory a pass allocates, per byte of its input.

asv's ``peakmem_`` benchmarks report the peak resident memory of the whole
benchmark process, so their numbers include the interpreter and the
imports (NumPy, Numba and, when installed, torch: some 360 MB here) and
only compare with each other.  The ``track_`` benchmarks here measure
what one pass itself allocates instead: with :mod:`tracemalloc`, started
after the imports and a warm-up call (compilation, caches), the peak of
the bytes NumPy, Numba and Python hold during one training forward (or one backward),
divided by the input's bytes.

Every pass must allocate its output (``y``, or ``dx``): 1.0 is the floor,
and anything above it is scratch of the input's size (partials of a few
long rows split across threads, float16 widened to float32 and back).
Allocations made inside compiled kernels are traced too: Numba's runtime
allocates through Python's raw allocator, which :mod:`tracemalloc` sees.
``tests/test_memory.py`` asserts the bound these numbers show.

Unit: "bytes/input byte".
"""

import gc
import tracemalloc

import numpy as np

import normkit

#: name -> (input shape, forward(x, **kw), backward): the issue's cells.
CASES = {
    "BatchNorm2d": ((16, 64, 32, 32), lambda x, **kw: normkit.batch_norm(
        x, np.zeros(64), np.ones(64), np.ones(64), np.zeros(64),
        training=True, **kw), normkit.batch_norm_backward),
    "GroupNorm": ((16, 64, 32, 32), lambda x, **kw: normkit.group_norm(
        x, 32, np.ones(64), np.zeros(64), **kw), normkit.group_norm_backward),
    "LayerNorm-rows": ((1024, 1024), lambda x, **kw: normkit.layer_norm(
        x, 1024, np.ones(1024), np.zeros(1024), **kw),
        normkit.layer_norm_backward),
    "LayerNorm-sample": ((16, 64, 32, 32), lambda x, **kw: normkit.layer_norm(
        x, (64, 32, 32), **kw), normkit.layer_norm_backward),
    "LayerNorm-long-rows": ((2, 1 << 20), lambda x, **kw: normkit.layer_norm(
        x, 1 << 20, **kw), normkit.layer_norm_backward),
    "RMSNorm": ((1024, 1024), lambda x, **kw: normkit.rms_norm(
        x, 1024, np.ones(1024), **kw), normkit.rms_norm_backward),
}

DTYPES = ("float32", "float16")


def peak_allocated(function):
    """Peak bytes NumPy, Numba and Python allocate while ``function()`` runs,
    over what was held when it started; its result is held until the
    peak has been read, as a caller would hold it."""
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - start


class PassMemory:
    """Peak bytes allocated by one warm training pass over input bytes."""

    params = [tuple(CASES), DTYPES]
    param_names = ["layer", "dtype"]
    unit = "bytes/input byte"
    timeout = 300

    def setup(self, layer, dtype):
        shape, self.forward, self.backward = CASES[layer]
        rng = np.random.default_rng(0)
        self.x = rng.normal(3.0, 2.0, shape).astype(dtype)
        self.dy = rng.standard_normal(shape).astype(dtype)
        _, self.saved = self.forward(self.x, return_saved=True)
        self.backward(self.dy, self.x, self.saved)  # warm: every kernel loaded

    def track_forward(self, layer, dtype):
        return peak_allocated(lambda: self.forward(self.x)) / self.x.nbytes

    def track_backward(self, layer, dtype):
        return peak_allocated(
            lambda: self.backward(self.dy, self.x, self.saved)) / self.x.nbytes
