"""normkit's API and its engine alone, each against torch, in one interleave.

Usage::

    python benchmarks/engine_vs_torch.py [--repeat 9] [--keep-memory]

For each cell, the passes ``benchmarks/compare.py`` times side by side
(the copy, normkit's training forward and forward and backward through
the API, torch's forward and forward and backward) and the same forward
and forward and backward through the engine alone
(:func:`normkit._bench.engine_callables`: the kernels and their dispatch,
without the API's checks, record, running statistics or the gradients'
casts) are timed interleaved, each following each equally often
(:func:`normkit._bench.median_times`).  It prints torch's time over
normkit's API and over its engine: where the engine is level with torch
and the API behind, what puts normkit behind is the Python around its
kernels, not the kernels.  ``--keep-memory`` as in ``compare.py``.
Nothing here asserts on a time.  Needs torch.
"""

import argparse
import sys

import normkit
from normkit import _bench
from normkit._bench import Case

#: The float32 cells of ``compare.py`` where torch's forward was ahead
#: of normkit's in some run of the benchmark page's tables (the
#: channels-last BatchNorm and GroupNorm, LayerNorm over rows of 1024,
#: over two long rows and over a whole sample), and a cell where
#: normkit's was ahead in every run, for scale.
CASES = (Case("batch_norm", (32, 56, 56, 64), -1),
         Case("group_norm", (32, 56, 56, 64), -1),
         Case("layer_norm", (8192, 1024), -1),
         Case("layer_norm", (2, 4194304), -1),
         Case("layer_norm", (32, 64, 56, 56), -1, normalized_ndim=3),
         Case("batch_norm", (32, 64, 56, 56), 1))

#: The passes timed, as :func:`measure` names them.
PASSES = ("copy", "fwd", "fwd+bwd", "torch fwd", "torch fwd+bwd",
          "engine fwd", "engine fwd+bwd")


def callables(case):
    """Every pass of :data:`PASSES` for ``case``, by name."""
    inputs = _bench.make_inputs(case)
    timed = _bench.implementations(case, inputs)
    _, saved = getattr(normkit, case.variant)(inputs.x, **inputs.kwargs,
                                              return_saved=True)
    forward, backward = _bench.engine_callables(saved, inputs)

    def forward_backward():
        forward()
        return backward()

    timed["engine fwd"] = forward
    timed["engine fwd+bwd"] = forward_backward
    return {name: timed[name] for name in PASSES}


def measure(case, repeat):
    """Median milliseconds of each of :data:`PASSES` for ``case``."""
    seconds = _bench.median_times(callables(case), repeat)
    return {name: 1e3 * seconds[name] for name in PASSES}


def row(case, ms):
    """One row of the table: times and torch's time over normkit's."""
    cells = [case.label]
    for step in ("fwd", "fwd+bwd"):
        torch_ms = ms[f"torch {step}"]
        cells += [f"{ms[step]:.2f}", f"{ms[f'engine {step}']:.2f}",
                  f"{torch_ms:.2f}", f"{torch_ms / ms[step]:.2f}",
                  f"{torch_ms / ms[f'engine {step}']:.2f}"]
    return cells + [f"{ms['copy']:.2f}"]


HEADERS = ["cell", "fwd api", "fwd engine", "fwd torch", "torch/api",
           "torch/engine", "f+b api", "f+b engine", "f+b torch",
           "torch/api", "torch/engine", "copy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=9)
    parser.add_argument("--keep-memory", action="store_true",
                        help="have glibc keep the memory this process frees "
                             "(normkit._bench.keep_freed_memory)")
    args = parser.parse_args(argv)
    if _bench.torch is None:
        sys.exit("engine_vs_torch.py needs torch (pip install torch==2.13.0)")
    kept = args.keep_memory and _bench.keep_freed_memory()
    if args.keep_memory and not kept:
        parser.error("--keep-memory: the C library is not glibc, or it "
                     "refused the setting")
    runs = _bench.runs_per_callable(args.repeat, len(PASSES))
    print(f"{_bench.machine_info()}; ms, median of {runs}, interleaved; "
          f"freed memory {'kept' if kept else 'left to glibc'}")
    rows = [row(case, measure(case, args.repeat)) for case in CASES]
    print(_bench.format_table(HEADERS, rows))
    print("\ntorch/api, torch/engine: torch's time over normkit's through "
          "the API and through the engine alone (above 1: normkit faster).")


if __name__ == "__main__":
    main()
