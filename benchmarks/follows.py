"""How much a pass slows the pass timed right after it.

Usage::

    python benchmarks/follows.py [--repeat 60]

For each cell, normkit's and torch's training forwards are each timed
right after every pass of the cell (the copy, normkit's forward and
forward+backward, torch's forward and forward+backward), untimed, that
itself ran right after an untimed run of the timed forward, and the
median of each pair is printed in microseconds.  On a machine with
few cores, a thread pool that keeps its threads spinning for a moment
after a parallel pass (Numba's and torch's each have their own) takes
cores from the next pass, so what a pass costs depends on what ran
before it: the reason ``normkit._bench.median_times`` lets every pass
follow every other equally often.  Needs torch.
"""

import argparse
import statistics
import time

from normkit import _bench
from normkit._bench import Case

#: Small batches, where a pool's spinning weighs most, a large cell, and
#: the two large cells whose forwards were slower than torch's in every
#: run of the benchmark page's table at ``c660801``.
CASES = (Case("group_norm", (2, 56, 56, 64), -1),
         Case("batch_norm", (2, 56, 56, 64), -1),
         Case("group_norm", (32, 64, 56, 56), 1),
         Case("batch_norm", (32, 56, 56, 64), -1),
         Case("layer_norm", (32, 64, 56, 56), normalized_ndim=3))

#: The passes timed after each predecessor.
TARGETS = ("fwd", "torch fwd")

#: The passes that precede them, untimed.
PREDECESSORS = ("copy", "fwd", "fwd+bwd", "torch fwd", "torch fwd+bwd")


def follows(case, repeat):
    """Median seconds of each of :data:`TARGETS` run right after each of
    :data:`PREDECESSORS` (which runs right after the target):
    ``{(target, predecessor): seconds}``."""
    timed = _bench.implementations(case, _bench.make_inputs(case))
    for name in PREDECESSORS:
        timed[name]()
    times = {(target, before): [] for target in TARGETS
             for before in PREDECESSORS}
    for _ in range(repeat):
        for before in PREDECESSORS:
            for target in TARGETS:
                timed[target]()  # the target's own pool busy last
                timed[before]()
                start = time.perf_counter()
                timed[target]()
                times[target, before].append(time.perf_counter() - start)
    return {pair: statistics.median(t) for pair, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=60)
    args = parser.parse_args(argv)
    if _bench.torch is None:
        parser.error("needs torch")
    print(f"{_bench.machine_info()}; us, median of {args.repeat}; "
          f"columns: the pass run just before")
    rows = []
    for case in CASES:
        medians = follows(case, args.repeat)
        rows += [[case.label, target] + [f"{1e6 * medians[target, before]:.0f}"
                                   for before in PREDECESSORS]
                 for target in TARGETS]
    print(_bench.format_table(["cell", "timed"] + list(PREDECESSORS), rows))


if __name__ == "__main__":
    main()
