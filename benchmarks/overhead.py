"""What a call costs beyond its kernels, in situ and on a warm cache.

Usage::

    python benchmarks/overhead.py [--repeat 201]

For each cell three callables are timed interleaved, each following each
equally often (:func:`normkit._bench.median_times`): the training forward
through the API, as ``benchmarks/compare.py`` times it (checks, the
scheme, its record and, for BatchNorm, the running statistics, around the
kernels); the same normalization through the engine alone
(:func:`normkit.engine.normalize_batch` over the view the forward records,
with its weight, bias and eps: the backend's kernels and their dispatch);
and ``x.copy()``.  Then, in a rotation of their own (:data:`ROTATIONS`),
the backward of that forward's record through the API (checks, the
gradients' casts and allocations around the kernels), the same backward
through the engine alone (:func:`normkit.engine.backward` with the
record's statistics and weight), and the copy again.  The difference of the
API's and the engine's time, forward or backward, is the Python around the
kernels *in situ*: a large input's kernels push that code's data out of
the caches (on this project's virtual machine, time alone does too,
without any traffic: ``benchmarks/pause.py``), so it runs at memory's
pace, not the cache's.  The same differences over a tiny input of the
cell's layout (two samples, every other axis but the channels or the
normalized row of length 1) are that cost on a warm cache.  The last three
columns are the tiny input's whole forward through the API on a warm cache
(timed as above), then its forward and its backward, each timed alone
right after one of ``--repeat`` forwards and backwards over the cell
(:func:`after_cell`), as a network's next layer meets it: the first touch
of each piece of code and data after such a pass costs microseconds (a
NumPy call, a lock, a dtype comparison), so the same call takes several
times longer there.  Nothing here asserts on a time.
"""

import argparse

import normkit
from normkit import _bench
from normkit._bench import Case

#: The cells: the small batches of ``benchmarks/compare.py``, then large
#: ones for scale.
CASES = (
    [Case(v, (2, 64, 56, 56), 1) for v in ("batch_norm", "group_norm")]
    + [Case(v, (2, 56, 56, 64), -1) for v in ("batch_norm", "group_norm")]
    + [Case("batch_norm", (32, 64, 56, 56), 1),
       Case("group_norm", (32, 64, 56, 56), 1),
       Case("batch_norm", (32, 56, 56, 64), -1),
       Case("group_norm", (32, 56, 56, 64), -1, "float16"),
       Case("layer_norm", (8192, 1024), -1)]
)


def recorded_backward(variant, inputs):
    """The record of ``variant``'s training forward over ``inputs`` and a
    callable that runs its backward through the API."""
    _, saved = getattr(normkit, variant)(inputs.x, **inputs.kwargs,
                                         return_saved=True)
    backward = getattr(normkit, f"{variant}_backward")
    return saved, lambda: backward(inputs.dy, inputs.x, saved)


def callables(case):
    """The API forward, the engine's normalization of the same view, the
    API backward of its record, the engine's backward of the same, and
    the copy of ``case``'s input."""
    inputs = _bench.make_inputs(case)
    api = _bench.implementations(case, inputs)
    saved, api_backward = recorded_backward(case.variant, inputs)
    engine_only, engine_backward = _bench.engine_callables(saved, inputs)
    return {"api": api["fwd"], "engine": engine_only,
            "api bwd": api_backward,
            "engine bwd": engine_backward, "copy": api["copy"]}


#: The callables of :func:`callables` timed in one rotation, the
#: forwards' first: a forward follows forwards and the copy, as it did
#: before the backwards were timed here too.  The copy reported is the
#: forwards' rotation's.
ROTATIONS = (("api", "engine", "copy"), ("api bwd", "engine bwd", "copy"))


def medians(case, repeat):
    """Median microseconds of each of :func:`callables` of ``case``, in
    the rotations of :data:`ROTATIONS`, each name's from the first
    rotation that times it."""
    timed = callables(case)
    result = {}
    for names in ROTATIONS:
        seconds = _bench.median_times({name: timed[name] for name in names},
                                      repeat)
        for name in names:
            result.setdefault(name, 1e6 * seconds[name])
    return result


def measure(case, repeat):
    """:func:`medians` of ``case`` and of ``_bench.tiny(case)``."""
    return medians(case, repeat), medians(_bench.tiny(case), repeat)


def after_cell(case, repeat):
    """Median microseconds of ``_bench.tiny(case)``'s API forward and of
    its API backward, each timed alone right after each of ``repeat``
    untimed normkit forwards and backwards over ``case`` (the two taking
    turns): ``{"fwd": ..., "bwd": ...}``."""
    cell = _bench.make_inputs(case)
    small = _bench.make_inputs(_bench.tiny(case))
    _, tiny_backward = recorded_backward(case.variant, small)
    seconds = _bench.median_after(
        {"fwd": lambda: _bench.normkit_forward(case.variant, small),
         "bwd": tiny_backward},
        lambda: _bench.normkit_forward_backward(case.variant, cell), repeat)
    return {step: 1e6 * t for step, t in seconds.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=201)
    args = parser.parse_args(argv)
    runs = _bench.runs_per_callable(args.repeat, len(ROTATIONS[0]))
    print(f"{_bench.machine_info()}; us, median of {runs}")
    rows = []
    for case in CASES:
        cell, warm = measure(case, args.repeat)
        after = after_cell(case, args.repeat)
        rows.append([case.label, f"{cell['api']:.0f}", f"{cell['engine']:.0f}",
                     f"{cell['copy']:.0f}",
                     f"{cell['api'] - cell['engine']:.0f}",
                     f"{warm['api'] - warm['engine']:.0f}",
                     f"{cell['api bwd']:.0f}", f"{cell['engine bwd']:.0f}",
                     f"{cell['api bwd'] - cell['engine bwd']:.0f}",
                     f"{warm['api bwd'] - warm['engine bwd']:.0f}",
                     f"{warm['api']:.0f}", f"{after['fwd']:.0f}",
                     f"{after['bwd']:.0f}"])
    print(_bench.format_table(
        ["cell", "api", "engine", "copy", "api - engine",
         "same, tiny input", "bwd api", "bwd engine", "bwd api - engine",
         "bwd same, tiny input", "tiny api", "tiny api after cell",
         "tiny bwd after cell"], rows))


if __name__ == "__main__":
    main()
