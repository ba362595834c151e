"""Chart of a ``benchmarks/compare.py --json`` run for the documentation.

Usage::

    python benchmarks/plot_compare.py [IN.json] [OUT.png]

(defaults: ``docs/_static/benchmarks.json`` and ``IN.png``).
Next to the chart it writes the full table as two CSV files of a few
columns each, ``OUT-normkit.csv`` (normkit against the copy) and
``OUT-torch.csv`` (torch and the float64 reference), which the benchmark
page includes.  A run with the ``normkit.torch`` cells (``--torch-adapter``)
also gives their table, ``OUT-adapter.csv``; a run of those cells alone
(``--adapter-only``) gives that table only, as ``OUT.csv``.
One row per measured cell (variant, shape, layout).  Left and middle: the
fraction of the copy's bandwidth that normkit and torch reach in the
forward and in the forward and backward (1.0: as fast as ``x.copy()``
moves the bytes the pass must move at least; see ``MIN_TRAFFIC`` in
compare.py).  Right: normkit's speed-up over torch (torch time over
normkit time, log scale; above 1, normkit is faster).  Cells torch does not
have show normkit only.  Needs matplotlib (the ``experiments`` extra).
"""

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from normkit import _bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NORMKIT, TORCH = "#4c72b0", "#dd8452"


def label(cell):
    """Row label: ``variant  shape  layout`` and the dtype unless float32."""
    shape = "×".join(str(n) for n in cell["shape"])
    dtype = "" if cell.get("dtype", "float32") == "float32" else f"  {cell['dtype']}"
    return f"{cell['variant']}  {shape}  {cell['layout']}{dtype}"


def _bars(ax, y, pairs, height=0.38):
    """normkit above, torch below, for each row; a missing value is no bar."""
    ours = [np.nan if a is None else a for a, _ in pairs]
    theirs = [np.nan if b is None else b for _, b in pairs]
    ax.barh(y - height / 2, ours, height, color=NORMKIT, label="normkit")
    ax.barh(y + height / 2, theirs, height, color=TORCH, label="torch")


def plot(data, out):
    cells = data["results"]
    y = np.arange(len(cells))
    frac = [c["frac_copy"] for c in cells]
    ms = [c["ms"] for c in cells]

    # Drawn at the size the page shows it (about 900 px wide), so that
    # 10-point text reads as 15 px.
    plt.rcParams.update({"font.size": 10})
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 0.34 * len(cells) + 1.6),
                             sharey=True, gridspec_kw={"wspace": 0.14})
    for ax, key, title in ((axes[0], "fwd", "forward"),
                           (axes[1], "fwd+bwd", "forward + backward")):
        _bars(ax, y, [(f[key], f["torch " + key]) for f in frac])
        ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
        ax.set_title(f"{title}:\nfraction of copy\nbandwidth", fontsize=10)
        ax.set_xlim(0, 1.15 * max(1.0, np.nanmax(
            [v for f in frac for v in (f[key], f["torch " + key]) if v is not None])))

    speedup = [(None if m["torch " + k] is None else m["torch " + k] / m[k])
               for m in ms for k in ("fwd", "fwd+bwd")]
    pairs = list(zip(speedup[0::2], speedup[1::2]))
    ax = axes[2]
    height = 0.38
    ax.barh(y - height / 2, [np.nan if a is None else a for a, _ in pairs],
            height, color="#55a868", label="forward")
    ax.barh(y + height / 2, [np.nan if b is None else b for _, b in pairs],
            height, color="#8172b3", label="forward + backward")
    ax.set_xscale("log")
    known = [v for pair in pairs for v in pair if v is not None]
    ax.set_xlim(min(0.5, 0.8 * min(known, default=1)),
                max(2.0, 1.3 * max(known, default=1)))
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50) if
             ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.minorticks_off()
    ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_title("speed-up over torch\n(torch time /\nnormkit time)", fontsize=10)
    for i, (a, b) in enumerate(pairs):
        if a is None and b is None:
            ax.text(1.0, i, " no torch op", va="center", fontsize=9, color="0.4")

    axes[0].set_yticks(y, [label(c) for c in cells], fontsize=10)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
        ax.tick_params(axis="x", labelsize=9)
    fig.legend(handles=axes[0].get_legend_handles_labels()[0]
               + axes[2].get_legend_handles_labels()[0],
               labels=["normkit", "torch", "forward", "forward + backward"],
               loc="lower center", ncol=4, fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.subplots_adjust(bottom=0.75 / fig.get_figheight())
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")


#: A cell that was not measured (a lone "-" would be a list in reST).
NONE = "–"


def _ms(value):
    return NONE if value is None else f"{value:.2f}"


def _x(value):
    return NONE if value is None else f"{value:.2f}"


def tables(data, stem):
    """Write the two CSV tables of the page; return their paths."""
    normkit_rows, torch_rows = [], []
    for c in data["results"]:
        ms, gbps, frac = c["ms"], c["gbps"], c["frac_copy"]
        ratio = lambda k: (None if ms["torch " + k] is None  # noqa: E731
                           else ms["torch " + k] / ms[k])
        normkit_rows.append([label(c), _ms(ms["copy"]), f"{gbps['copy']:.0f}",
                             _ms(ms["fwd"]), _x(frac["fwd"]),
                             _ms(ms["fwd+bwd"]), _x(frac["fwd+bwd"])])
        torch_rows.append([label(c), _ms(ms["torch fwd"]),
                           _ms(ms["torch fwd+bwd"]),
                           NONE if ratio("fwd") is None else f"{ratio('fwd'):.2f}×",
                           NONE if ratio("fwd+bwd") is None else f"{ratio('fwd+bwd'):.2f}×",
                           "skipped" if ms["ref fwd"] is None else _ms(ms["ref fwd"])])
    paths = []
    for suffix, header, rows in (
            ("normkit", ["cell", "copy ms", "copy GB/s", "fwd ms", "fwd frac",
                         "fwd+bwd ms", "fwd+bwd frac"], normkit_rows),
            ("torch", ["cell", "torch fwd ms", "torch fwd+bwd ms",
                       "fwd ×", "fwd+bwd ×", "ref fwd ms"],
             torch_rows)):
        paths.append(write_csv(stem.with_name(f"{stem.name}-{suffix}.csv"),
                               header, rows))
    return paths


def write_csv(path, header, rows):
    """Write a CSV table of ``header`` and ``rows`` to ``path``; return
    ``path``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


#: Columns of the ``normkit.torch`` table: the times of
#: ``normkit._bench.ADAPTER_TIMED``, then what the adapter adds to
#: normkit's own time and normkit.torch's speed-up over torch's module.
ADAPTER_HEADER = ["variant", "shape", "layout", "dtype", "pass", "torch ms",
                  "normkit.torch ms", "compiled ms", "NumPy ms", "eager/NumPy",
                  "torch/eager"]


def adapter_table(data, path):
    """Write the ``normkit.torch`` cells of ``data`` as a CSV table (two
    rows per cell, forward and forward and backward) to ``path``."""
    rows = []
    for c in data["torch_adapter"]:
        for step in ("fwd", "fwd+bwd"):
            s = _bench.adapter_times(c["seconds"], step)
            rows.append([c["variant"], str(tuple(c["shape"])), c["layout"],
                         c["dtype"], step]
                        + [f"{1e3 * t:.2f}" for t in s.values()]
                        + [f"{s['normkit.torch'] / s['numpy']:.2f}x",
                           f"{s['torch'] / s['normkit.torch']:.2f}x"])
    return write_csv(path, ADAPTER_HEADER, rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else ROOT / "docs" / "_static" / "benchmarks.json"
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    data = json.loads(Path(src).read_text())
    stem = out.with_suffix("")
    written = []
    if data["results"]:
        plot(data, out)
        written += tables(data, stem)
    if data.get("torch_adapter"):
        name = f"{stem.name}-adapter" if data["results"] else stem.name
        written.append(adapter_table(data, stem.with_name(f"{name}.csv")))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
