"""The whole small-batch study in one call: what ``normkit compare`` runs.

Output folder layout::

    <out>/cells/<variant>-b<batch>-s<seed>-<settings hash>.json   one per run
    <out>/results.json        settings, sweeps (cells, summary) and studies
    <out>/accuracy.png        test error against batch size, one panel per variant
    <out>/estimators.png      batch statistics against theory
    <out>/mismatch.png        train/inference mismatch and batch dependence

A study may hold several *sweeps* over the same cells with different
:class:`~normkit.analysis.sweep.Settings` (``--preset mnist``: the same
number of epochs at every batch size, and the same number of steps).
"""

from dataclasses import asdict, dataclass
from pathlib import Path
import sys
import time

from . import data, report, sweep
from .estimators import estimator_study
from .mismatch import StudyKernels, batch_dependence, mismatch_study
from .variants import VARIANTS


@dataclass(frozen=True)
class Preset:
    """What ``normkit compare --preset NAME`` runs unless options say
    otherwise: the cells and one :class:`Settings` per sweep."""

    variants: tuple
    batch_sizes: tuple
    seeds: tuple
    sweeps: tuple
    about: str


#: Steps of every run of the fixed-steps sweep of ``--preset mnist``: the
#: steps of 10 epochs at batch 32 (4,000 training images).
MNIST_STEPS = 1250

_MNIST = dict(dataset="mnist", network="conv", width=16, last_stage=7)

PRESETS = {
    "quick": Preset(
        tuple(VARIANTS), (2, 4, 8, 16, 32, 64), (0, 1, 2),
        (sweep.Settings(epochs=20),),
        "digits (8x8), one conv and one dense layer, 20 epochs; a few minutes"),
    "mnist": Preset(
        tuple(VARIANTS), (2, 4, 8, 16, 32, 64), (0, 1, 2),
        (sweep.Settings(epochs=10, **_MNIST),
         sweep.Settings(epochs=10, steps=MNIST_STEPS, **_MNIST)),
        "MNIST (28x28, 5,000 images), a conv net normalized after every "
        "convolution down to 7x7; 10 epochs, and 1,250 steps, at every batch "
        "size; an hour or more on 2 cores"),
}


def sweep_label(settings):
    """A short name of a sweep's settings, for tables and legends."""
    settings = settings if isinstance(settings, dict) else asdict(settings)
    length = (f"{settings['steps']} steps" if settings["steps"]
              else f"{settings['epochs']} epochs")
    network = ("conv net, last stage "
               f"{settings['last_stage']}x{settings['last_stage']}"
               if settings["network"] == "conv" else "small net")
    return f"{settings['dataset']}, {network}, {length}"


def run_compare(out, variants, batch_sizes, seeds, settings=sweep.Settings(),
                jobs=1, plots=True, draws=20000, stream=None, progress=True,
                on_cell=None, scheduler=None):
    """Run the sweep(s) and the three studies, save everything, print tables.

    Parameters
    ----------
    out : path
        Output folder (created; finished cells in it are reused).
    variants, batch_sizes, seeds : sequences
        The sweep's cells; the studies use the same variants and batch
        sizes.
    settings : Settings or sequence of Settings
        One sweep per Settings, each over all the cells.
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
    scheduler : optional
        Passed to :func:`~normkit.analysis.sweep.run_sweep` (a Dask
        cluster).

    Returns
    -------
    dict
        What ``results.json`` holds: ``settings``, ``sweeps`` (per sweep:
        ``label``, ``settings``, ``cells``, ``summary``, ``extents``),
        ``estimators``, ``mismatch``, ``batch_dependence``, ``elapsed``.
    """
    stream = sys.stdout if stream is None else stream
    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = [settings] if isinstance(settings, sweep.Settings) else list(settings)
    reused = []

    def count(cell, was_reused):
        reused.append(was_reused)
        if on_cell is not None:
            on_cell(cell, was_reused)

    runs = run_sweeps([(variants, one) for one in sweeps], batch_sizes, seeds,
                      out, jobs, scheduler, progress, count)
    done = []
    for one, cells in zip(sweeps, runs):
        image_size = data.load_split(one.dataset)[0].shape[-1]
        done.append({"label": sweep_label(one), "settings": asdict(one),
                     "cells": cells, "summary": report.summarize(cells),
                     "extents": report.norm_extents(asdict(one),
                                                    batch_sizes, image_size)})
    if progress:
        print("estimator, mismatch and batch-dependence studies...",
              file=sys.stderr, flush=True)
    # as for the sweeps: this process loads the studies' kernels from the
    # cache, never runs code it compiled itself
    sweep.warm_kernel_cache(variants, batch_sizes, StudyKernels(),
                            announce=progress)
    results = {"settings": {"variants": list(variants),
                            "batch_sizes": list(batch_sizes),
                            "seeds": list(seeds), "estimator_draws": draws},
               "sweeps": done,
               "estimators": estimator_study(batch_sizes, draws=draws),
               "mismatch": mismatch_study(variants, batch_sizes),
               "batch_dependence": batch_dependence(variants, batch_sizes)}
    sweep.write_atomic(out / "results.json", results)
    written = [out / "results.json"]
    if plots:
        written += _plot(results, out)
    print_tables(results, stream)
    elapsed = report.duration(time.monotonic() - start)
    print(f"\n{sum(reused)} of {len(reused)} cells reused from {out / 'cells'}; "
          f"wrote {', '.join(str(p) for p in written)}; elapsed {elapsed}",
          file=stream)
    if progress:
        print(f"done in {elapsed}", file=sys.stderr, flush=True)
    return results


def run_sweeps(sweeps, batch_sizes, seeds, out, jobs=1, scheduler=None,
              progress=True, on_cell=None, warm=True):
    """Run several sweeps of :func:`~normkit.analysis.sweep.run_sweep` in
    one folder behind one progress bar (on stderr), on one Dask client
    when ``scheduler`` is given (connected once, closed at the end when
    this function opened it).

    ``sweeps`` is a sequence of ``(variants, settings)``; returns the
    cells of each sweep, in order.  ``on_cell(cell, reused)`` follows
    every cell.  With ``warm``, the first sweep with cells to compute
    fills the kernel cache (:func:`~normkit.analysis.sweep.run_sweep`) for
    all: the sweeps of a study differ in settings, not in the kernels
    their networks run.
    """
    total = sum(len(variants) for variants, _ in sweeps) * len(batch_sizes) * len(seeds)
    bar = report.ProgressBar(total, eta_after=jobs) if progress else None
    began = []

    def advance(cell, was_reused):
        if bar is not None:
            bar.update(note=f"{cell['variant']} batch {cell['batch_size']} "
                            f"seed {cell['seed']}", reused=was_reused)
        if on_cell is not None:
            on_cell(cell, was_reused)

    def begin(n):
        if n and not began:
            began.append(True)
            if bar is not None:
                bar.begin()

    from . import cluster
    client = local = None
    if isinstance(scheduler, str) and len(sweeps) > 1:
        client, local = cluster.connect(scheduler, jobs)
    try:
        # the sweeps of one study share their kernels (the same network
        # with other settings): one warm-up, for the first sweep to compute
        return [sweep.run_sweep(variants, batch_sizes, seeds, settings, out,
                                jobs, advance, warm=warm and not began,
                                scheduler=client or scheduler, on_start=begin)
                for variants, settings in sweeps]
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            cluster._close(client, local)


def _plot(results, out):
    from . import plots
    return [plots.plot_accuracy(results["sweeps"], out / "accuracy.png"),
            plots.plot_estimators(results["estimators"], out / "estimators.png"),
            plots.plot_mismatch(results["mismatch"], results["batch_dependence"],
                                out / "mismatch.png")]


def print_tables(results, stream):
    """The tables of ``results`` as text on ``stream``."""
    settings = results["settings"]
    for one in results["sweeps"]:
        print_sweep(one, settings["seeds"], stream)
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


def print_sweep(one, seeds, stream):
    """The accuracy tables of one sweep and where BatchNorm's ``m`` is."""
    settings, summary = one["settings"], one["summary"]
    length = (f"{settings['steps']} optimizer steps" if settings["steps"]
              else f"{settings['epochs']} epochs")
    print(f"\n== {one['label']} ==\nTest accuracy (%), inference mode with "
          f"the running statistics training left, mean ± std over seeds "
          f"{seeds}; {length} at every batch size, learning rate "
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
    print("\nBatchNorm's m (values per channel it normalizes over) at each "
          "normalized layer:", file=stream)
    extents = one["extents"]
    print(report.format_table(list(extents[0]),
                              [list(row.values()) for row in extents]),
          file=stream)


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
