"""Command line of normkit: ``normkit [check] [options]``.

``check`` (also what runs without a subcommand) runs every variant's
training forward and backward on a few small and medium shapes, compares
``y``, ``dx``, ``dweight`` and ``dbias`` with the float64 reference and
times both.  It exits with 0 when every comparison passes, 1 otherwise.
"""

import argparse
import sys

import numpy as np

from . import _bench

#: Default shapes of ``check``: (shape, channel axis) per layout.
CHANNEL_SHAPES = (((16, 32, 28, 28), 1), ((16, 28, 28, 32), -1))
ROW_SHAPES = (((256, 512), -1),)

#: Groups of group_norm in ``check`` (4 channels per group).
GROUPS = 8

DTYPES = ("float16", "float32", "float64")

#: Largest error allowed, relative to ``max(1, max|reference|)`` per output.
TOLERANCE = {"float16": 5e-3, "float32": 5e-5, "float64": 1e-10}

def default_cases(variants=_bench.VARIANTS, dtypes=DTYPES):
    """The configurations ``check`` runs.

    Every shape of a variant in float32 and float64; float16 on its first
    shape only (it is converted to float32 at the boundary, so one shape
    covers it).
    """
    cases = []
    for variant in variants:
        shapes = ROW_SHAPES if variant == "layer_norm" else CHANNEL_SHAPES
        for i, (shape, axis) in enumerate(shapes):
            for dtype in dtypes:
                if dtype != "float16" or i == 0:
                    cases.append(_bench.Case(variant, shape, axis, dtype, GROUPS))
    return cases


def max_error(case, inputs):
    """Largest error of normkit's ``y``, ``dx``, ``dweight``, ``dbias``.

    Each output's max absolute error against the float64 reference is
    divided by ``max(1, max|reference|)`` so that the sums ``dweight`` and
    ``dbias`` are judged on the scale of their values.
    """
    # the reference first: normkit updates the running statistics in place
    expected = _bench.reference_forward_backward(case.variant, inputs)
    actual = _bench.normkit_forward_backward(case.variant, inputs)
    worst = 0.0
    for got, want in zip(actual, expected):
        if got.shape != want.shape:
            return np.inf
        scale = max(1.0, float(np.abs(want).max()))
        error = float(np.abs(got.astype(np.float64) - want).max()) / scale
        worst = max(worst, error if np.isfinite(error) else np.inf)
    return worst


def check(cases, repeat):
    """Run, compare and time ``cases``; print the table.

    Returns
    -------
    bool
        True when every case is within its tolerance.
    """
    print(_bench.machine_info())
    print("compiling kernels (first run only)...", flush=True)
    rows = []
    for case in cases:
        inputs = _bench.make_inputs(case)
        error = max_error(case, inputs)
        ok = error <= TOLERANCE[case.dtype]
        timed = _bench.implementations(case, inputs)
        names = ("fwd", "ref fwd", "fwd+bwd", "ref fwd+bwd")
        ms = {name: 1e3 * t for name, t in _bench.median_times(
            {name: timed[name] for name in names}, repeat).items()}
        rows.append([case.variant, str(case.shape), case.layout, case.dtype,
                     f"{error:.1e}", "pass" if ok else "FAIL",
                     f"{ms['fwd']:.2f}", f"{ms['ref fwd']:.2f}",
                     f"{ms['ref fwd'] / ms['fwd']:.1f}x",
                     f"{ms['fwd+bwd']:.2f}", f"{ms['ref fwd+bwd']:.2f}",
                     f"{ms['ref fwd+bwd'] / ms['fwd+bwd']:.1f}x"])
    headers = ["variant", "shape", "layout", "dtype", "max err", "status",
               "fwd ms", "ref fwd ms", "speedup", "fwd+bwd ms",
               "ref fwd+bwd ms", "speedup"]
    print(_bench.format_table(headers, rows))
    n_failed = sum(row[5] == "FAIL" for row in rows)
    print(f"{len(rows) - n_failed} of {len(rows)} checks passed "
          f"(max err: relative to max(1, max|reference|); tolerance "
          + ", ".join(f"{d} {t:g}" for d, t in TOLERANCE.items()) + ")")
    return n_failed == 0


def build_parser():
    """The argument parser; ``check`` is also the default subcommand."""
    parser = argparse.ArgumentParser(
        prog="normkit", description="normkit command line.")
    commands = parser.add_subparsers(dest="command", metavar="command")
    check_parser = commands.add_parser(
        "check", help="compare every variant with the float64 reference and "
                      "time it (the default)",
        description="Run every variant's training forward and backward, "
                    "compare with the float64 reference and time both.")
    check_parser.add_argument(
        "--dtype", action="append", choices=DTYPES,
        help="only this dtype (repeatable; default: all)")
    check_parser.add_argument(
        "--variant", action="append", choices=_bench.VARIANTS,
        help="only this variant (repeatable; default: all)")
    check_parser.add_argument(
        "--repeat", type=_bench.positive_int, default=5,
        help="timed runs per measurement, median reported (default: 5)")
    return parser


def main(argv=None):
    """Entry point of ``normkit`` and ``python -m normkit``.

    Returns
    -------
    int
        Exit status: 0 when every check passes, 1 otherwise.  Bad options
        exit with status 2 (argparse).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "check")
    args = build_parser().parse_args(argv)
    cases = default_cases(args.variant or _bench.VARIANTS,
                          args.dtype or DTYPES)
    return 0 if check(cases, args.repeat) else 1
