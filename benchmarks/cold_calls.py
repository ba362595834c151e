"""What single steps of a forward cost right after a pass over memory.

Usage::

    python benchmarks/cold_calls.py [--repeat 101] [--after torch]

Each step below is timed alone right after an untimed forward and
backward over the small channels-first GroupNorm ``(2, 64, 56, 56)`` of
``benchmarks/compare.py``, normkit's or (``--after torch``) torch's (the
steps taking turns, one per pass), and on a warm cache (``timeit``, back
to back).  The steps are pieces of the way
from a call to the kernels over a tiny input of the same layout, ``(2, 64,
1, 1)``: a call of nothing, NumPy calls the backend makes, Numba's thread
count (Numba's public function, and the work plans' getter,
:func:`normkit.backend.plan.thread_count`), the engine's normalization
and the API's whole forward.  After the pass, each first touch of code and data pays the caches' and the
address translation's misses, whatever the step computes; this is why
``benchmarks/overhead.py``'s tiny forward takes several times longer
after a pass than on a warm cache.  Nothing here asserts on a time.
"""

import argparse
import timeit

import numba
import numpy as np

import normkit
from normkit import _bench, engine
from normkit._bench import Case
from normkit.backend.plan import thread_count

#: The pass before each timed step.
CELL = Case("group_norm", (2, 64, 56, 56), 1)


def steps():
    """The timed steps, by name, over the tiny input of :data:`CELL`'s
    layout."""
    tiny = _bench.make_inputs(Case(CELL.variant, (2, 64, 1, 1), CELL.axis))
    x = tiny.x
    _, saved = normkit.group_norm(x, **tiny.kwargs, return_saved=True)
    weight, bias = tiny.kwargs["weight"], tiny.kwargs["bias"]
    float16 = np.dtype(np.float16)
    return {
        "nothing": lambda: None,
        "x.reshape(-1)": lambda: x.reshape(-1),
        "np.empty((2, 32))": lambda: np.empty((2, 32)),
        "x.dtype == np.float16": lambda: x.dtype == np.float16,
        "x.dtype is float16": lambda: x.dtype is float16,
        "numba.get_num_threads()": numba.get_num_threads,
        "plan.thread_count()": thread_count,
        "engine.normalize_batch": lambda: engine.normalize_batch(
            x, saved.view, weight, bias),
        "group_norm (API)": lambda: _bench.normkit_forward(CELL.variant,
                                                           tiny),
    }


def the_pass(after):
    """The untimed forward and backward over :data:`CELL`: normkit's, or
    torch's for ``after="torch"``."""
    cell = _bench.make_inputs(CELL)
    if after == "torch":
        return _bench.torch_callables(CELL, cell)[1]
    return lambda: _bench.normkit_forward_backward(CELL.variant, cell)


def after_pass(timed, repeat, after="normkit"):
    """Median microseconds of each of ``timed``, each run alone right
    after :func:`the_pass` ``(after)``, in turns."""
    seconds = _bench.median_after(timed, the_pass(after), repeat)
    return {name: 1e6 * t for name, t in seconds.items()}


def warm(timed, number=2000):
    """Microseconds per call of each of ``timed`` back to back (the best
    of five rounds of ``number`` calls)."""
    return {name: 1e6 * min(timeit.repeat(step, number=number, repeat=5))
            / number for name, step in timed.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=101)
    parser.add_argument("--after", choices=("normkit", "torch"),
                        default="normkit",
                        help="whose forward and backward runs before each "
                             "step (torch: as in compare.py's table)")
    args = parser.parse_args(argv)
    timed = steps()
    cold = after_pass(timed, args.repeat, args.after)
    hot = warm(timed)
    print(f"{_bench.machine_info()}; us, after {args.after}'s pass: median "
          f"of {args.repeat}")
    print(_bench.format_table(
        ["step", "after the pass", "warm"],
        [[name, f"{cold[name]:.1f}", f"{hot[name]:.2f}"] for name in timed]))


if __name__ == "__main__":
    main()
