"""What writing into fresh memory costs on this machine, serially and in parallel.

Usage::

    python benchmarks/first_touch.py [--mib 32] [--repeat 21]

A new output array of several MiB is fresh memory: the operating system
maps its pages on their first write (a page fault per page).  This times
one pass that writes every value of an array of ``--mib`` MiB, from one
thread and split over Numba's threads, into a fresh array (allocated before
each run, outside the timing) and into one already written (warm), and
prints the median and the fastest run of each.  The difference between
fresh and warm is what the page faults cost; the parallel fresh time shows
whether faults taken by several threads at once scale on this machine.
Nothing here asserts on a time.
"""

import argparse
import time

import numba
import numpy as np
from numba import njit, prange


@njit(cache=True)
def _write_serial(a):
    for i in range(a.size):
        a[i] = 1.0


@njit(cache=True, parallel=True)
def _write_parallel(a):
    for i in prange(a.size):
        a[i] = 1.0


def _times(write, make, repeat):
    write(make())  # compile or load
    runs = []
    for _ in range(repeat):
        target = make()
        start = time.perf_counter()
        write(target)
        runs.append(time.perf_counter() - start)
    return np.median(runs) * 1e3, min(runs) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args(argv)
    size = args.mib * (1 << 20) // 4
    warm = np.zeros(size, np.float32)
    print(f"{args.mib} MiB of float32, {numba.get_num_threads()} Numba threads; "
          f"ms, median (fastest) of {args.repeat}")
    for label, write in (("one thread", _write_serial),
                         ("all threads", _write_parallel)):
        fresh = _times(write, lambda: np.empty(size, np.float32), args.repeat)
        again = _times(write, lambda: warm, args.repeat)
        print(f"  {label:12s} fresh {fresh[0]:7.2f} ({fresh[1]:.2f})   "
              f"warm {again[0]:7.2f} ({again[1]:.2f})")


if __name__ == "__main__":
    main()
