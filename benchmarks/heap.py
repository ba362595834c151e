"""What glibc's handling of freed memory does to passes that allocate outputs.

Usage::

    python benchmarks/heap.py [--processes 4] [--repeat 9]
                              [--variant batch_norm] [--shape 32 56 56 64]
                              [--axis -1] [--dtype float32]

Every forward and backward allocates its outputs afresh.  Whether those
land on pages the process has already written, or on new pages that the
system maps on their first write (a page fault each), is up to glibc's
``malloc``, which gives large freed blocks back to the system depending
on what the process allocated before (see
:func:`normkit._bench.keep_freed_memory`).

This runs ``--processes`` rounds of child processes: in each round, for
normkit's forward and backward of one cell and for torch's (when
installed), one child with glibc's defaults and one with freed memory
kept.  Each child times its pass ``--repeat`` times, each call right
after ``x.copy()``, counts each call's page faults (minor faults, from
``getrusage``) and prints the medians: one line per child.  This process
compiles the kernels first, so that every child loads the same code from
Numba's cache.  Nothing here asserts on a time.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from normkit import _bench

#: The child processes' two settings of the allocator.
MODES = ("default", "kept")

#: The passes timed: normkit's forward and backward, and torch's where torch
#: has the variant (:func:`normkit._bench.implementations`).
PASSES = ("fwd+bwd", "torch fwd+bwd")


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(case, repeat, name):
    """Median milliseconds and median page faults of one call of pass
    ``name`` of ``case`` (``"fwd+bwd"``, normkit's forward and backward,
    or ``"torch fwd+bwd"``), each call right after ``x.copy()``."""
    impl = _bench.implementations(case, _bench.make_inputs(case))
    impl[name]()
    times, faults = [], []
    for _ in range(repeat):
        impl["copy"]()
        before = _minor_faults()
        start = time.perf_counter()
        impl[name]()
        times.append(time.perf_counter() - start)
        faults.append(_minor_faults() - before)
    return {"ms": 1e3 * statistics.median(times),
            "faults": statistics.median(faults)}


def _case(args):
    return _bench.Case(args.variant, tuple(args.shape), args.axis, args.dtype)


def _child(args):
    """One process: :func:`measure` of ``args.timed`` in ``args.child``'s
    setting of the allocator, printed as JSON."""
    kept = args.child == "kept" and _bench.keep_freed_memory()
    print(json.dumps({"mode": args.child, "kept": kept, "pass": args.timed,
                      **measure(_case(args), args.repeat, args.timed)}))


def run_children(args, passes):
    """``args.processes`` rounds of one child for each setting of the
    allocator and each of ``passes``, in turn: their :func:`measure`
    results, in the order they ran."""
    forwarded = ["--variant", args.variant, "--shape",
                 *map(str, args.shape), "--axis", str(args.axis), "--dtype",
                 args.dtype, "--repeat", str(args.repeat)]
    results = []
    for _ in range(args.processes):
        for mode in MODES:
            for name in passes:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--timed",
                     name, *forwarded],
                    check=True, capture_output=True, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=_bench.positive_int, default=4,
                        help="rounds of child processes (default 4)")
    parser.add_argument("--repeat", type=_bench.positive_int, default=9,
                        help="timed calls per pass in each child (default 9)")
    parser.add_argument("--variant", default="batch_norm")
    parser.add_argument("--shape", type=int, nargs="+",
                        default=[32, 56, 56, 64])
    parser.add_argument("--axis", type=int, default=-1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--timed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    case = _case(args)
    impl = _bench.implementations(case, _bench.make_inputs(case))
    passes = [name for name in PASSES if name in impl]
    impl["fwd+bwd"]()  # compiles the kernels the children load
    del impl
    print(f"{_bench.machine_info()}\n{case.label}: forward and backward, "
          f"each call right after x.copy(), medians of {args.repeat} "
          f"calls, one process per line and pass\n")
    rows = []
    for result in run_children(args, passes):
        unset = result["mode"] == "kept" and not result["kept"]
        rows.append([result["mode"] + (" (not set)" if unset else ""),
                     "normkit" if result["pass"] == "fwd+bwd" else "torch",
                     f"{result['ms']:.2f}", f"{result['faults']:.0f}"])
    print(_bench.format_table(["freed memory", "pass", "ms", "faults"], rows,
                              markdown=True))
    print("\nfaults: the median call's minor page faults; default: glibc's "
          "own thresholds; kept: normkit._bench.keep_freed_memory().")


if __name__ == "__main__":
    main()
