"""asv suites of the CPU engine: time, peak memory, bandwidth, torch ratio.

Every suite is a class whose ``params`` are drawn from variant, shape
family, layout (channels-first or channels-last), dtype and batch size;
asv runs each method once per combination, each in a fresh process.  ``setup`` builds the inputs with
:func:`normkit._bench.make_inputs` (the data ``normkit check`` and
``benchmarks/compare.py`` use) and calls every timed function once, so
that Numba compilation (or loading from its on-disk cache) is never
timed.  Combinations that do not apply raise ``NotImplementedError`` in
``setup``, which asv reports as skipped.

- :class:`Training` and :class:`Inference`: ``time_forward``,
  ``time_backward`` and ``time_forward_backward``.  Inference uses fixed
  (running) statistics, so it covers the variants that have them
  (:data:`INFERENCE_VARIANTS`).
- :class:`Rows`: the same training passes of LayerNorm and RMSNorm over
  rows of several widths (:data:`ROW_WIDTHS`), the grid's shapes aside.
- :class:`Memory`: ``peakmem_forward_backward`` in training mode.
- :class:`Bandwidth`: effective bandwidth of the training forward and
  forward+backward as a fraction of ``x.copy()``'s on the same array.
- :class:`TorchRatio`: torch CPU time over normkit time (above 1: normkit
  is faster), when torch is installed.

The cold start (import, first-call compilation) is in ``bench_cold_start``.
"""

import numpy as np

import normkit
from normkit import _bench
from normkit._bench import Case

#: Input shapes of each family for batch size ``n``, channels-first and
#: channels-last: 64-channel 32x32 feature maps, and 512-channel sequences
#: of 128 steps (channels-last: 128 tokens of width 512).
FAMILIES = {
    "image": lambda n: ((n, 64, 32, 32), (n, 32, 32, 64)),
    "sequence": lambda n: ((n, 512, 128), (n, 128, 512)),
}

#: Variants benchmarked: those of ``normkit check`` and the schemes built on
#: the public path that normalize activations.
VARIANTS = _bench.VARIANTS + ("rms_norm", "ghost_batch_norm")

LAYOUTS = ("channels_first", "channels_last")
DTYPES = ("float32", "float16")
BATCHES = (2, 32)

#: Variants with inference statistics of their own, timed in inference mode
#: (float32 only: float16 adds the same boundary conversion as in training).
INFERENCE_VARIANTS = ("batch_norm", "instance_norm", "batch_renorm",
                      "ghost_batch_norm")

#: Values moved by a forward (read x, write y) and by a forward+backward
#: (also read dy and x, write dx), in units of the array's size.
FORWARD_TRAFFIC = 2
FORWARD_BACKWARD_TRAFFIC = 5


def make_case(variant, family, layout, dtype, batch):
    """The :class:`normkit._bench.Case` of one parameter combination.

    Raises
    ------
    NotImplementedError
        For channels-first input of a variant that normalizes the trailing
        axis (layer_norm, rms_norm): only its channels-last shape applies;
        for ghost_batch_norm when its virtual batch does not divide the
        batch (asv skips the combination).
    """
    first, last = FAMILIES[family](batch)
    if layout == "channels_last":
        case = Case(variant, last, -1, dtype)
    else:
        case = Case(variant, first, 1, dtype)
    if variant == "ghost_batch_norm" and batch % case.virtual_batch_size:
        raise NotImplementedError(f"ghost batches of {case.virtual_batch_size} "
                                  f"do not divide a batch of {batch}")
    if layout == "channels_first" and case.layout == "rows":
        raise NotImplementedError(f"{variant} normalizes the trailing axis; "
                                  f"benchmarked channels-last only")
    return case


def inference_kwargs(variant, kwargs):
    """Keyword arguments of the inference forward of ``variant``.

    Variants with a ``training`` flag get ``training=False`` (their running
    statistics normalize); instance_norm gets running statistics and
    ``use_input_stats=False``.

    Raises
    ------
    NotImplementedError
        For variants whose inference forward is their training forward
        (group_norm, layer_norm): nothing separate to measure.
    """
    if "training" in kwargs:
        return {**kwargs, "training": False}
    if variant == "instance_norm":
        channels = kwargs["weight"].size
        dtype = kwargs["weight"].dtype
        return {**kwargs, "running_mean": np.zeros(channels, dtype),
                "running_var": np.ones(channels, dtype),
                "use_input_stats": False}
    raise NotImplementedError(f"{variant} has no inference statistics; its "
                              f"inference forward is the training forward")


class _Grid:
    """Parameter grid shared by the suites."""

    params = [VARIANTS, tuple(FAMILIES), LAYOUTS, DTYPES, BATCHES]
    param_names = ["variant", "family", "layout", "dtype", "batch"]


class _Prepared(_Grid):
    """Inputs of one combination in one mode, every kernel already compiled."""

    training = True
    timeout = 120

    def setup(self, variant, family, layout, dtype, batch):
        self._prepare(make_case(variant, family, layout, dtype, batch))

    def _prepare(self, case):
        variant = self.variant = case.variant
        inputs = _bench.make_inputs(case)
        if not self.training:
            inputs.kwargs = inference_kwargs(variant, inputs.kwargs)
        self.inputs = inputs
        self.backward_fn = getattr(normkit, f"{variant}_backward")
        _, self.saved = getattr(normkit, variant)(inputs.x, **inputs.kwargs,
                                                  return_saved=True)
        self._forward_backward()  # compiles or loads every kernel used

    def _forward_backward(self):
        _bench.normkit_forward_backward(self.variant, self.inputs)


class _Passes(_Prepared):
    """Forward, backward and forward+backward, timed."""

    def time_forward(self, *params):
        _bench.normkit_forward(self.variant, self.inputs)

    def time_backward(self, *params):
        self.backward_fn(self.inputs.dy, self.inputs.x, self.saved)

    def time_forward_backward(self, *params):
        self._forward_backward()


class Training(_Passes):
    """Training mode: batch statistics, running statistics updated."""


#: Row widths of :class:`Rows`, each over :data:`ROWS_VALUES` values in
#: all: the CPU backend's plan for LayerNorm and RMSNorm rows changes with
#: the width (rows summed one or two at a time, in blocks of rows per work
#: item or per thread, or over columns in a pass of their own).
ROW_WIDTHS = (1024, 4096, 16384, 65536, 262144)

#: Values of each :class:`Rows` input (8 MiB in float32).
ROWS_VALUES = 1 << 21


class Rows(_Passes):
    """Training passes of LayerNorm and RMSNorm over rows of each of
    :data:`ROW_WIDTHS` values, the same number of values in all: where a
    row width costs more per value than another."""

    params = [_bench.ROW_VARIANTS, ROW_WIDTHS, DTYPES]
    param_names = ["variant", "width", "dtype"]

    def setup(self, variant, width, dtype):
        self._prepare(Case(variant, (ROWS_VALUES // width, width), -1, dtype))


class Inference(_Passes):
    """Inference mode: running statistics normalize (BatchNorm,
    InstanceNorm with tracked statistics, Batch Renormalization)."""

    params = [INFERENCE_VARIANTS, tuple(FAMILIES), LAYOUTS, ("float32",),
              BATCHES]
    training = False


class Memory(_Prepared):
    """Peak memory of a training forward and backward at batch 32.

    asv reports the peak resident memory of the whole benchmark process,
    imports included (numpy, Numba and, when installed, torch: some 360 MB
    here), so compare rows with each other rather than with array sizes.
    """

    params = [VARIANTS, ("image",), LAYOUTS, DTYPES, (32,)]

    def peakmem_forward_backward(self, *params):
        self._forward_backward()


class _Measured(_Grid):
    """Median times of the implementations of one float32 training case."""

    params = [VARIANTS, tuple(FAMILIES), LAYOUTS, BATCHES]
    param_names = ["variant", "family", "layout", "batch"]
    unit = "ratio"
    #: Timed runs per implementation, at least: after two warm-ups, in
    #: whole cycles in which each follows each equally often
    #: (:func:`normkit._bench.median_times`).
    repeat_runs = 7

    def _median_times(self, variant, family, layout, batch, names):
        case = make_case(variant, family, layout, "float32", batch)
        timed = _bench.implementations(case, _bench.make_inputs(case))
        missing = [name for name in names if name not in timed]
        if missing:
            raise NotImplementedError(f"not available: {', '.join(missing)}")
        return _bench.median_times({name: timed[name] for name in names},
                                   self.repeat_runs)


class Bandwidth(_Measured):
    """Effective bandwidth as a fraction of a copy of the same array.

    The effective bandwidth of a pass is the least memory traffic it needs
    (:data:`FORWARD_TRAFFIC`, :data:`FORWARD_BACKWARD_TRAFFIC` arrays) over
    its time; ``x.copy()`` moves 2 arrays.  1.0 means as fast as the copy
    per byte.  Batch 32 only: batch-2 arrays fit in cache, where the ratio
    says little about memory bandwidth.
    """

    params = [VARIANTS, tuple(FAMILIES), LAYOUTS, (32,)]

    def setup(self, variant, family, layout, batch):
        self.t = self._median_times(variant, family, layout, batch,
                                    ("copy", "fwd", "fwd+bwd"))

    def track_forward_copy_fraction(self, *params):
        return (FORWARD_TRAFFIC / 2) * self.t["copy"] / self.t["fwd"]

    def track_forward_backward_copy_fraction(self, *params):
        return (FORWARD_BACKWARD_TRAFFIC / 2) * self.t["copy"] / self.t["fwd+bwd"]


class TorchRatio(_Measured):
    """torch CPU time over normkit time, same data and thread count.

    Above 1: normkit is faster.  Skipped when torch is not installed or has
    no such variant (batch_renorm).
    """

    def setup(self, variant, family, layout, batch):
        if _bench.torch is None:
            raise NotImplementedError("torch is not installed")
        self.t = self._median_times(variant, family, layout, batch,
                                    ("fwd", "fwd+bwd", "torch fwd",
                                     "torch fwd+bwd"))

    def track_forward(self, *params):
        return self.t["torch fwd"] / self.t["fwd"]

    def track_forward_backward(self, *params):
        return self.t["torch fwd+bwd"] / self.t["fwd+bwd"]
