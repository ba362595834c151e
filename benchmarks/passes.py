"""What a forward's passes cost, next to the passes memory allows.

Usage::

    python benchmarks/passes.py [--repeat 24] [--per-value | --segments]

A normalization forward must read every value of ``x`` (its statistics)
before it can write the first value of ``y``, so it is at least a *read
pass* followed by a *write pass* over an input-sized array.  For each cell
this times, in warm memory (every output array written before, so no page
faults: ``benchmarks/first_touch.py`` prices those), interleaved so that
each follows each equally often (:func:`normkit._bench.median_times`):

- ``read``: a parallel pass that reads ``x`` (a sum per chunk);
- ``write``: a parallel pass that writes an array of ``x``'s size;
- ``copy``: ``np.copyto`` from ``x`` into an array of its size;
- ``moments``: the statistics alone (:func:`normkit.engine.moments`);
- ``normalize``: the map alone with those statistics
  (:func:`normkit.engine.apply_affine`);
- ``forward``: both in one call (:func:`normkit.engine.normalize_batch`),
  whose kernels normalize a group while it is in cache where a work item
  holds whole groups.

It prints those medians and three ratios: ``forward`` over ``read +
write`` (the floor above; near 1, the forward costs what its two passes
of memory cost), over ``copy``, and over ``moments + normalize`` (what
normalizing from cache saves).

With ``--per-value`` it asks instead whether the statistics, the map and
the forward of :data:`PER_VALUE_CELLS` are bound by their arithmetic or by
memory.  Each pass runs over three inputs, each input's passes timed on
their own (interleaved as above) so that a small one stays in cache: the
cell's first rows or samples, small enough for one core's cache, on one
thread; the whole cell on one thread; and the whole cell on all of
Numba's threads.  It prints nanoseconds per value and per thread (the
time, times the threads, over the values), less the pass's fixed cost
(the same call over two samples with one value per channel, or two rows:
``_bench.tiny``).  Where the whole cell on all threads costs each thread
about what the cached slice costs one, every thread computes at its
in-cache pace and the pass is bound by its arithmetic; where it costs
several times more, by memory.

With ``--segments`` it times the map alone over short segments instead,
on one thread (ns per value): channels-first BatchNorm over ``A``
samples of segments of ``L`` pixels (a view ``(1, A, K, 1, L)`` of about
:data:`SEGMENT_VALUES` values, :func:`normkit.engine.apply_affine`, the
inference forward and the map of every pass whose plan splits the
samples), for each ``A`` of :data:`SEGMENT_ROWS` and ``L`` of
:data:`SEGMENT_LENGTHS`.  Where its kernel maps a block of whole groups
per row or a group at a time depends on both
(:data:`normkit.backend.cpu.BLOCK_MAP_SEGMENT`).  Nothing here asserts on
a time.
"""

import argparse
import dataclasses
import math

import numba
import numpy as np
from numba import njit, prange

import normkit
from normkit import _bench, engine
from normkit._bench import Case
from normkit.backend.protocol import inverse_std
from normkit.backend.storage import storage_view

#: The cells: large forwards of ``benchmarks/compare.py``, each layout and
#: kind of work item, and one in half precision.
CASES = (
    Case("batch_norm", (32, 64, 56, 56), 1),
    Case("group_norm", (32, 64, 56, 56), 1),
    Case("batch_norm", (32, 56, 56, 64), -1),
    Case("layer_norm", (8192, 1024), -1),
    Case("layer_norm", (32, 64, 56, 56), -1, normalized_ndim=3),
    Case("batch_norm", (32, 64, 56, 56), 1, "float16"),
)

#: The cells of ``--per-value``, each with the shape of its slice that
#: stays in one core's cache (input and output).
PER_VALUE_CELLS = (
    [(Case("layer_norm", (8192, 1024), -1, dtype), (128, 1024))
     for dtype in ("float32", "float16", "bfloat16")]
    + [(Case("batch_norm", (32, 64, 56, 56), 1, dtype), (1, 16, 56, 56))
       for dtype in ("float32", "float16", "bfloat16")]
)

#: The passes of ``--per-value``.
PER_VALUE_PASSES = ("moments", "normalize", "forward")

#: Rows ``A`` (samples) and segment lengths ``L`` (pixels) of
#: ``--segments``, and about how many values each of its inputs holds
#: (``K = SEGMENT_VALUES // (A * L)`` channels, 8 at least).
SEGMENT_ROWS = (4, 8, 16, 32, 64, 128)
SEGMENT_LENGTHS = (9, 16, 25, 49, 64, 100, 196)
SEGMENT_VALUES = 400_000

#: Values per chunk of the read and write passes (one chunk per prange step).
CHUNK = 1 << 16

#: ``eps`` of the forward, and of the statistics the map alone is given.
EPS = 1e-5

#: Columns timed, in table order.
TIMED = ("read", "write", "copy", "moments", "normalize", "forward")


@njit(parallel=True, fastmath=True)
def _read_pass(a):
    """Sum of each chunk of ``a`` (the values as stored), summed."""
    n_chunks = (a.size + CHUNK - 1) // CHUNK
    partial = np.zeros(n_chunks)
    for c in prange(n_chunks):
        block = a[c * CHUNK:min((c + 1) * CHUNK, a.size)]
        total = block[0] - block[0]  # zero, in the values' arithmetic type
        for i in range(block.size):
            total += block[i]
        partial[c] = total
    return partial.sum()


@njit(parallel=True)
def _write_pass(a, value):
    """``a[:] = value``, chunk by chunk in parallel."""
    n_chunks = (a.size + CHUNK - 1) // CHUNK
    for c in prange(n_chunks):
        block = a[c * CHUNK:min((c + 1) * CHUNK, a.size)]
        for i in range(block.size):
            block[i] = value


def callables(case):
    """The callables of :data:`TIMED` for ``case``, over one input and one
    warm output of its shape and dtype."""
    inputs = _bench.make_inputs(case)
    x = inputs.x
    _, saved = getattr(normkit, case.variant)(x, **inputs.kwargs,
                                              return_saved=True)
    view, centered = saved.view, saved.centered
    weight = inputs.kwargs.get("weight")
    bias = inputs.kwargs.get("bias")
    out = np.zeros_like(x)
    stored_x, stored_out = storage_view(x), storage_view(out)
    one = stored_out.dtype.type(1)
    mean, var = engine.moments(x, view, centered)
    rstd = inverse_std(var, EPS)
    return {
        "read": lambda: _read_pass(stored_x),
        "write": lambda: _write_pass(stored_out, one),
        "copy": lambda: np.copyto(out, x),
        "moments": lambda: engine.moments(x, view, centered),
        "normalize": lambda: engine.apply_affine(x, view, mean, rstd, weight,
                                                 bias, out=out),
        "forward": lambda: engine.normalize_batch(x, view, weight, bias, EPS,
                                                  centered, out=out),
    }


def row(case, t):
    """Formatted cells of one row: the medians in ms, then the ratios."""
    return ([case.label] + [f"{1e3 * t[k]:.3f}" for k in TIMED]
            + [f"{t['forward'] / (t['read'] + t['write']):.2f}",
               f"{t['forward'] / t['copy']:.2f}",
               f"{t['forward'] / (t['moments'] + t['normalize']):.2f}"])


HEADERS = (["cell"] + [f"{k} ms" for k in TIMED]
           + ["fwd/(read+write)", "fwd/copy", "fwd/(mom+norm)"])


def _on_threads(call, threads):
    """``call`` run on ``threads`` Numba threads."""
    def run():
        numba.set_num_threads(threads)
        return call()
    return run


def per_value(case, slice_shape, repeat):
    """``{pass: (slice on one thread, cell on one thread, cell on all
    threads)}`` in nanoseconds per value and per thread, less the pass's
    fixed cost, for each of :data:`PER_VALUE_PASSES`."""
    everyone = numba.get_num_threads()
    timed = {"tiny": callables(_bench.tiny(case)),
             "slice": callables(dataclasses.replace(case, shape=slice_shape)),
             "cell": callables(case)}  # the cell's inputs made once
    runs = (("tiny", 1), ("slice", 1), ("cell", 1), ("cell", everyone))
    medians = {}
    try:
        for name, threads in runs:
            medians[name, threads] = _bench.median_times(
                {p: _on_threads(timed[name][p], threads)
                 for p in PER_VALUE_PASSES}, repeat)
    finally:
        numba.set_num_threads(everyone)
    values = {"slice": math.prod(slice_shape), "cell": math.prod(case.shape)}
    return {p: tuple((medians[name, threads][p] - medians["tiny", 1][p])
                     * threads / values[name] * 1e9
                     for name, threads in runs[1:])
            for p in PER_VALUE_PASSES}


def segment_costs(rows, lengths, repeat, values=SEGMENT_VALUES):
    """``{(A, L): ns}``: the median of the map alone per value over a view
    ``(1, A, K, 1, L)`` of float32 (``--segments``), on one thread, all
    its cells interleaved."""
    rng = np.random.default_rng(0)
    calls = {}
    for a in rows:
        for length in lengths:
            view = normkit.View(1, a, max(8, values // (a * length)), 1,
                                length)
            x = rng.standard_normal(math.prod(view.dims)).astype(np.float32)
            mean, var = engine.moments(x, view)
            rstd = inverse_std(var, EPS)
            out = np.empty_like(x)
            calls[a, length] = (x.size, lambda x=x, v=view, m=mean, r=rstd,
                                o=out: engine.apply_affine(x, v, m, r, out=o))
    everyone = numba.get_num_threads()
    try:
        medians = _bench.median_times(
            {key: _on_threads(call, 1) for key, (_, call) in calls.items()},
            repeat)
    finally:
        numba.set_num_threads(everyone)
    return {key: medians[key] / calls[key][0] * 1e9 for key in calls}


def _print_segments(repeat):
    costs = segment_costs(SEGMENT_ROWS, SEGMENT_LENGTHS, repeat,
                          SEGMENT_VALUES)
    print(f"{_bench.machine_info()}; the map alone over (1, A, K, 1, L) "
          f"float32, about {SEGMENT_VALUES} values, one thread; ns per "
          f"value, median of "
          f"{_bench.runs_per_callable(repeat, len(costs))}")
    rows = [[str(a)] + [f"{costs[a, n]:.3f}" for n in SEGMENT_LENGTHS]
            for a in SEGMENT_ROWS]
    print(_bench.format_table(["A \\ L"] + [str(n) for n in SEGMENT_LENGTHS],
                              rows))


def _print_per_value(repeat):
    everyone = numba.get_num_threads()
    print(f"{_bench.machine_info()}; warm memory; ns per value and per "
          f"thread, less the pass's fixed cost; median of "
          f"{_bench.runs_per_callable(repeat, len(PER_VALUE_PASSES))}")
    rows = [[case.label, p] + [f"{v:.3f}" for v in values]
            for case, slice_shape in PER_VALUE_CELLS
            for p, values in per_value(case, slice_shape, repeat).items()]
    print(_bench.format_table(["cell", "pass", "slice, 1 thread",
                               "cell, 1 thread", f"cell, {everyone} threads"],
                              rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=24)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--per-value", action="store_true",
                      help="per-value costs in and out of cache instead")
    mode.add_argument("--segments", action="store_true",
                      help="the map over short segments, by rows and "
                           "segment length, instead")
    args = parser.parse_args(argv)
    if args.per_value:
        _print_per_value(args.repeat)
        return
    if args.segments:
        _print_segments(args.repeat)
        return
    runs = _bench.runs_per_callable(args.repeat, len(TIMED))
    print(f"{_bench.machine_info()}; warm memory, ms, median of {runs}")
    rows = [row(case, _bench.median_times(callables(case), args.repeat))
            for case in CASES]
    print(_bench.format_table(HEADERS, rows))


if __name__ == "__main__":
    main()
