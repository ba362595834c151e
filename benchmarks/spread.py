"""The spread of several ``benchmarks/compare.py --json`` runs, cell by cell.

Usage::

    python benchmarks/spread.py [--csv OUT.csv] RUN.json [RUN.json ...]

One row per cell (variant, shape, layout, dtype) measured in every run:
the least and the greatest, over the runs, of normkit's forward and
forward+backward time over the copy's, of normkit's speed-up over torch
(torch's time over normkit's; above 1: normkit faster), and of the copy's
own time.  The ``goal`` column says whether the forward (``F``) and the
forward+backward (``B``) stayed within :data:`GOALS` in every run (capital
letter), in some (small letter) or in none (``·``); ``vs torch`` says
whether normkit was faster in every run (``faster``), slower in every run
(``slower``) or either (``either``).  Runs with the ``normkit.torch``
cells (``--torch-adapter`` or ``--adapter-only``) add a table of those:
per cell and pass, the least and the greatest time of the eager and of
the compiled module over normkit's on NumPy arrays (what the adapter
adds), and the eager module's speed-up over torch's.  Ratios within a run
are what to compare: the machine's speed drifts between runs, torch's
and normkit's alike (``docs/benchmarks.rst``).  ``--csv`` also writes the
main table to ``OUT.csv``, as the benchmark page includes it.
"""

import argparse
import csv
import json

from normkit import _bench

#: Goals of the forward and of the forward+backward, in copies of the
#: input: a small batch (an input under :data:`SMALL_BYTES`, which the
#: caches hold and a fixed cost per call weighs on) and every other cell.
GOALS = {"small": (2.0, 3.5), "large": (1.2, 3.0)}

#: Inputs smaller than this are held to the small-batch goals.
SMALL_BYTES = 4 * 2 ** 20


def cell_key(cell):
    """``variant shape layout dtype`` of one JSON cell."""
    shape = "x".join(str(n) for n in cell["shape"])
    return f"{cell['variant']} {shape} {cell['layout']} {cell['dtype']}"


def _within(values, goal):
    """``all``, ``some`` or ``none`` of ``values`` at most ``goal``."""
    met = sum(v <= goal for v in values)
    return "all" if met == len(values) else "some" if met else "none"


def _side(speedups):
    """``faster``, ``slower`` or ``either`` over a cell's runs."""
    if min(speedups) > 1:
        return "faster"
    return "slower" if max(speedups) < 1 else "either"


def _range(values):
    return f"{min(values):.2f}-{max(values):.2f}"


def spread(runs):
    """Per cell measured in every run: a dict of the ranges and verdicts
    the table prints (times over the copy, speed-ups over torch, goals)."""
    cells = {}
    for run in runs:
        for cell in run["results"]:
            cells.setdefault(cell_key(cell), []).append(cell)
    rows = {}
    for key, measured in cells.items():
        if len(measured) != len(runs):
            continue
        ms = [cell["ms"] for cell in measured]
        size = "small" if measured[0]["bytes"] < SMALL_BYTES else "large"
        row = {"size": size, "copy ms": [m["copy"] for m in ms]}
        for name, goal in zip(("fwd", "fwd+bwd"), GOALS[size]):
            row[f"{name}/copy"] = [m[name] / m["copy"] for m in ms]
            row[f"{name} goal"] = _within(row[f"{name}/copy"], goal)
            if ms[0][f"torch {name}"] is not None:
                row[f"{name} vs torch"] = [m[f"torch {name}"] / m[name]
                                           for m in ms]
        rows[key] = row
    return rows


GOAL_MARK = {"all": str.upper, "some": str.lower, "none": lambda _: "·"}

HEADERS = ["cell", "size", "fwd/copy", "fwd+bwd/copy", "goal",
           "fwd vs torch", "fwd+bwd vs torch", "copy ms"]


def table_row(key, row):
    goal = (GOAL_MARK[row["fwd goal"]]("F")
            + GOAL_MARK[row["fwd+bwd goal"]]("B"))
    row_cells = [key, row["size"], _range(row["fwd/copy"]),
                 _range(row["fwd+bwd/copy"]), goal]
    for name in ("fwd", "fwd+bwd"):
        speedups = row.get(f"{name} vs torch")
        row_cells.append("–" if speedups is None
                         else f"{_side(speedups)} {_range(speedups)}")
    return row_cells + [_range(row["copy ms"])]


def adapter_spread(runs):
    """Per ``normkit.torch`` cell and pass measured in every run:
    ``{"eager/numpy": [...], "compiled/numpy": [...], "torch/eager": [...]}``,
    one ratio per run."""
    cells = {}
    for run in runs:
        for cell in run.get("torch_adapter", ()):
            for step in ("fwd", "fwd+bwd"):
                key = f"{cell_key(cell)} {step}"
                cells.setdefault(key, []).append(
                    _bench.adapter_times(cell["seconds"], step))
    return {key: {"eager/numpy": [s["normkit.torch"] / s["numpy"] for s in t],
                  "compiled/numpy": [s["normkit.torch compiled"] / s["numpy"]
                                     for s in t],
                  "torch/eager": [s["torch"] / s["normkit.torch"] for s in t]}
            for key, t in cells.items() if len(t) == len(runs)}


ADAPTER_HEADERS = ["cell and pass", "eager/numpy", "compiled/numpy",
                   "torch/eager"]


def adapter_row(key, row):
    return [key, _range(row["eager/numpy"]), _range(row["compiled/numpy"]),
            f"{_side(row['torch/eager'])} {_range(row['torch/eager'])}"]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="The spread of several compare.py --json runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN.json")
    parser.add_argument("--csv", metavar="OUT.csv",
                        help="also write the main table there, as CSV")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    print(f"{len(runs)} runs; least-greatest over the runs")
    rows = [table_row(key, row) for key, row in spread(runs).items()]
    if rows:
        print(_bench.format_table(HEADERS, rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([HEADERS] + rows)
    adapter = [adapter_row(key, row)
               for key, row in adapter_spread(runs).items()]
    if adapter:
        print("\nnormkit.torch: eager and compiled module over normkit on "
              "NumPy arrays; torch's module over the eager one")
        print(_bench.format_table(ADAPTER_HEADERS, adapter))


if __name__ == "__main__":
    main()
