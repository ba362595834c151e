"""The whole small-batch study in one call: what ``normkit compare`` runs.

Output folder layout::

    <out>/cells/<variant>-b<batch>-s<seed>-<settings hash>.json   one per run
    <out>/results.json        settings, cells, summary and the three studies
    <out>/accuracy.png        accuracy against batch size per variant
    <out>/estimators.png      batch statistics against theory
    <out>/mismatch.png        train/inference mismatch and batch dependence
"""

from dataclasses import asdict
from pathlib import Path
import sys
import time

from . import report, sweep
from .estimators import estimator_study
from .mismatch import batch_dependence, mismatch_study


def run_compare(out, variants, batch_sizes, seeds, settings=sweep.Settings(),
                jobs=1, plots=True, draws=20000, stream=None, progress=True,
                on_cell=None):
    """Run the sweep and the three studies, save everything, print tables.

    Parameters
    ----------
    out : path
        Output folder (created; finished cells in it are reused).
    variants, batch_sizes, seeds : sequences
        The sweep's cells; the studies use the same variants and batch
        sizes.
    settings : Settings
    jobs : int
        Worker processes for the sweep.
    plots : bool
        Write the PNG plots (needs matplotlib).
    draws : int
        Simulated batches per point of the estimator study.
    stream : file, optional
        Where the tables go (default: stdout); the progress bar goes to
        stderr.
    progress : bool
    on_cell : callable, optional
        Passed to :func:`~normkit.analysis.sweep.run_sweep`.

    Returns
    -------
    dict
        What ``results.json`` holds: ``settings``, ``cells``, ``summary``,
        ``estimators``, ``mismatch``, ``batch_dependence``.
    """
    stream = sys.stdout if stream is None else stream
    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_cells = len(variants) * len(batch_sizes) * len(seeds)
    bar = report.ProgressBar(n_cells) if progress else None
    reused = []

    def advance(cell, was_reused):
        reused.append(was_reused)
        if bar is not None:
            bar.update(note=f"{cell['variant']} batch {cell['batch_size']} "
                            f"seed {cell['seed']}")
        if on_cell is not None:
            on_cell(cell, was_reused)

    try:
        cells = sweep.run_sweep(variants, batch_sizes, seeds, settings, out,
                                jobs, advance)
    finally:
        if bar is not None:
            bar.close()
    if progress:
        print("estimator, mismatch and batch-dependence studies...",
              file=sys.stderr, flush=True)
    results = {"settings": {"variants": list(variants),
                            "batch_sizes": list(batch_sizes),
                            "seeds": list(seeds), **asdict(settings),
                            "estimator_draws": draws},
               "cells": cells, "summary": report.summarize(cells),
               "estimators": estimator_study(batch_sizes, draws=draws),
               "mismatch": mismatch_study(variants, batch_sizes),
               "batch_dependence": batch_dependence(variants, batch_sizes)}
    sweep.write_atomic(out / "results.json", results)
    written = [out / "results.json"]
    if plots:
        written += _plot(results, out)
    print_tables(results, stream)
    print(f"\n{sum(reused)} of {len(cells)} cells reused from {out / 'cells'}; "
          f"wrote {', '.join(str(p) for p in written)}; "
          f"{time.monotonic() - start:.0f} s", file=stream)
    return results


def _plot(results, out):
    from . import plots
    return [plots.plot_accuracy(results["summary"], out / "accuracy.png"),
            plots.plot_estimators(results["estimators"], out / "estimators.png"),
            plots.plot_mismatch(results["mismatch"], results["batch_dependence"],
                                out / "mismatch.png")]


def print_tables(results, stream):
    """The tables of ``results`` as text on ``stream``."""
    settings = results["settings"]
    summary = results["summary"]
    print(f"\nTest accuracy (%), inference mode with the running statistics "
          f"training left, mean ± std over seeds {settings['seeds']}; "
          f"{settings['epochs']} epochs at every batch size, learning rate "
          f"{settings['base_lr']} x batch / {settings['reference_batch']}:",
          file=stream)
    print(report.grid_table(summary, ("variant",), report.accuracy_cell("accuracy")),
          file=stream)
    if any(row["diverged"] for row in summary):
        print("(! : some runs stopped at a non-finite loss)", file=stream)
    reestimated = [row for row in summary if row["population_reestimated"]]
    if reestimated:
        print("\nSame networks after population re-estimation of the running "
              "statistics over the training set:", file=stream)
        print(report.grid_table(reestimated, ("variant",),
                                report.accuracy_cell("population")), file=stream)
    print(estimator_line(results["estimators"]), file=stream)
    print("\nTrain/inference mismatch, RMS(train-mode - inference-mode output) "
          "on synthetic conv features:", file=stream)
    print(report.grid_table(results["mismatch"], ("variant", "method", "variance"),
                            lambda row: f"{row['mismatch']:.3f}"), file=stream)
    print("(method batch: no running statistics, inference uses the input's "
          "own; cumulative: momentum=None, which remembers the drift of the "
          "inputs early in training)", file=stream)
    print("\nBatch dependence, RMS change of one sample's training-mode output "
          "when the rest of its batch is replaced:", file=stream)
    print(report.grid_table(results["batch_dependence"], ("variant",),
                            lambda row: f"{row['change']:.3f}"), file=stream)
    if "batch_renorm" in settings["variants"]:
        print("(batch_renorm: while r and d stay inside their clipping "
              "bounds, its training output is (x - running_mean) / "
              "running_std, the inference output, whatever the rest of the "
              "batch; the batch still enters its gradients)", file=stream)


def estimator_line(rows):
    """One paragraph on the estimator study: the largest distance of an
    empirical bias or variance from theory, in standard errors, and the
    chi-square check."""
    worst = max(abs(row[key] - row[f"{key}_theory"]) / row[f"{key}_se"]
                for row in rows
                for key in ("mean_bias", "mean_var", "var_biased_bias",
                            "var_biased_var", "var_unbiased_bias",
                            "var_unbiased_var"))
    pvalues = [row["chi2_ks_pvalue"] for row in rows
               if row["chi2_ks_pvalue"] is not None]
    text = (f"\nEstimator study ({len(rows)} (distribution, m) points, "
            f"{rows[0]['draws']} batches each): every empirical bias and "
            f"variance of mu_B, biased and unbiased sigma_B^2 lies within "
            f"{worst:.1f} standard errors of theory.")
    if pvalues:
        text += (f" Gaussian m sigma_B^2 / sigma^2 against chi-square(m - 1): "
                 f"smallest KS p-value {min(pvalues):.3f} over {len(pvalues)} m.")
    return text
