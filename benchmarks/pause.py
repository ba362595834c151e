"""What a small batch's forward costs right after the process pauses.

Usage::

    python benchmarks/pause.py [--repeat 41] [--pauses 0 0.1 1 10]
                               [--threads N]

For each small batch of ``benchmarks/compare.py`` (two samples of
``(64, 56, 56)``), normkit's training forward and, when installed,
torch's are timed alone right after a pause of each length (ms): the
thread sleeping (``time.sleep``), then the thread busy in a loop that
touches nothing but the clock.  A pause of 0 is the two forwards taking
turns back to back.  Nothing is computed during a pause, so what the
forward costs beyond the pause of 0 is what it pays for data, code and
threads left alone that long: the time an earlier layer of a network
takes, or the other passes of ``compare.py``'s interleave, puts a small
batch's forward somewhere on this scale.  Nothing here asserts on a
time.  ``--threads`` sets Numba's and torch's thread counts (default:
Numba's, which torch then takes).
"""

import argparse
import time

import numba

from normkit import _bench
from normkit._bench import Case

#: The cells: compare.py's small batches.
CASES = ([Case(v, (2, 64, 56, 56), 1) for v in ("batch_norm", "group_norm")]
         + [Case(v, (2, 56, 56, 64), -1) for v in ("batch_norm", "group_norm")])

#: The forwards timed, as :func:`normkit._bench.implementations` names them.
FORWARDS = ("fwd", "torch fwd")


def busy(seconds):
    """A callable that keeps the thread busy for ``seconds``, reading only
    the clock."""
    def wait():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    return wait


def sleep(seconds):
    """A callable that sleeps for ``seconds``."""
    return lambda: time.sleep(seconds)


def pauses(milliseconds):
    """``(label, callable)`` of each pause: sleeping, then busy, for each
    length in ``milliseconds`` (one pause of nothing for 0)."""
    out = []
    for ms in milliseconds:
        if ms == 0:
            out.append(("none", lambda: None))
        else:
            out += [(f"sleep {ms:g} ms", sleep(ms / 1e3)),
                    (f"busy {ms:g} ms", busy(ms / 1e3))]
    return out


def measure(case, milliseconds, repeat):
    """``{pause label: {forward: median seconds}}`` for ``case``: each
    forward of :data:`FORWARDS` that exists, timed alone right after each
    pause, the forwards taking turns."""
    timed = _bench.implementations(case, _bench.make_inputs(case))
    forwards = {name: timed[name] for name in FORWARDS if name in timed}
    for forward in forwards.values():
        forward()
    return {label: _bench.median_after(forwards, pause, repeat)
            for label, pause in pauses(milliseconds)}


def non_negative(text):
    """argparse type: a float >= 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=_bench.positive_int, default=41)
    parser.add_argument("--pauses", type=non_negative, nargs="+",
                        default=[0, 0.1, 1, 10],
                        help="pause lengths in ms (0: back to back)")
    parser.add_argument("--threads", type=_bench.positive_int,
                        help="Numba's and torch's thread count")
    args = parser.parse_args(argv)
    if args.threads is not None:
        numba.set_num_threads(args.threads)
        if _bench.torch is not None:
            _bench.torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        for label, medians in measure(case, args.pauses, args.repeat).items():
            rows.append([case.label, label]
                        + [f"{1e3 * medians[name]:.3f}" if name in medians
                           else "" for name in FORWARDS])
    print(f"{_bench.machine_info()}; ms, median of {args.repeat}")
    print(_bench.format_table(["cell", "pause", "normkit fwd", "torch fwd"],
                              rows))


if __name__ == "__main__":
    main()
