"""Why normalization helps: the claims of Ioffe and Szegedy (2015) and
Santurkar et al. (2018) as studies, what ``normkit study NAME`` runs.

Each study is a few sweeps of MLP cells (:mod:`normkit.analysis.mlp`) run
by :func:`~normkit.analysis.compare.run_sweeps` (resumable, worker
processes, Dask), then a summary, a table, ``results.json`` and figures.
Output folder layout::

    <out>/cells/<variant>-b<batch>-s<seed>-<settings hash>.json   one per run
    <out>/results.json     study, settings, sweeps (label, settings, cells), summary
    <out>/*.png            the study's figures

The studies (:data:`STUDIES`):

- ``mnist-sigmoid``: Ioffe and Szegedy's MNIST network (3 x 100 sigmoid,
  batch 60): test accuracy over training and the 15/50/85th percentiles
  of one last-hidden-layer sigmoid input;
- ``learning-rate``: final accuracy and divergence at the base learning
  rate, 5x and 30x, ReLU and sigmoid;
- ``landscape``: loss range, gradient change and effective
  beta-smoothness along the gradient, internal covariate shift per layer,
  and the noisy-BatchNorm control;
- ``placement``: the normalizer before or after the activation, per batch
  size.
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path
import sys
import time
from typing import Callable

import numpy as np

from . import report, sweep
from .compare import run_sweeps
from .mlp import PERCENTILES, MLPSettings
from .variants import VARIANTS, check_variants

#: The learning rate every study calls "base" (SGD with momentum 0.9): the
#: rate of the learning-rate study's 1x, and of the other studies.
BASE_LR = 0.01

#: Multiples of :data:`BASE_LR` of the learning-rate study (Ioffe and
#: Szegedy's 5x and 30x).
LR_MULTIPLES = (1, 5, 30)

#: The level of the noisy-BatchNorm control's :class:`StepNoise`.
NOISE_LEVEL = 1.0


def dense_variants():
    """The rows of ``VARIANTS`` that normalize dense features, and
    ``none``: the default variants of every study."""
    return tuple(name for name, row in VARIANTS.items()
                 if name == "none" or row.dense((4,), 4) is not None)


@dataclass(frozen=True)
class Study:
    """One study's defaults: ``sweeps(variants, steps)`` gives its
    ``(label, variants, MLPSettings)`` sweeps."""

    about: str
    batch_sizes: tuple
    seeds: tuple
    steps: int
    sweeps: Callable


def _sigmoid(variants, steps):
    return [("sigmoid", variants, MLPSettings(
        steps=steps, lr=BASE_LR, eval_every=max(1, steps // 20)))]


def _learning_rate(variants, steps):
    return [(f"{activation}, lr {multiple}x", variants, MLPSettings(
        steps=steps, lr=BASE_LR * multiple, activation=activation))
        for activation in ("relu", "sigmoid") for multiple in LR_MULTIPLES]


def _landscape(variants, steps):
    relu = MLPSettings(steps=steps, lr=BASE_LR, activation="relu",
                       probe_every=max(1, steps // 8))
    sweeps = [("relu", variants, relu)]
    if "batch_norm" in variants:
        sweeps.append(("relu, batch_norm + noise", ("batch_norm",),
                       replace(relu, noise=NOISE_LEVEL)))
    return sweeps


def _placement(variants, steps):
    return [(f"{placement} the activation", variants, MLPSettings(
        steps=steps, lr=BASE_LR, activation="relu", placement=placement))
        for placement in ("before", "after")]


#: The studies by name: defaults that run in minutes on 2 cores.
STUDIES = {
    "mnist-sigmoid": Study(
        "Ioffe and Szegedy's MNIST network (3 x 100 sigmoid, batch 60): test "
        "accuracy over training, percentiles of a last-layer sigmoid input",
        (60,), (0, 1, 2), 3000, _sigmoid),
    "learning-rate": Study(
        "final accuracy and divergence at 1x, 5x and 30x the base learning "
        "rate, ReLU and sigmoid", (60,), (0, 1, 2), 1500, _learning_rate),
    "landscape": Study(
        "loss range, gradient change and effective beta-smoothness along "
        "the gradient; internal covariate shift; noisy BatchNorm",
        (60,), (0, 1, 2), 2000, _landscape),
    "placement": Study(
        "normalization before or after the activation, per batch size",
        (4, 16, 60), (0, 1, 2), 1500, _placement),
}


def _spread(values):
    """Mean and sample standard deviation (0 for one value; NaN for none:
    every run diverged before it was measured)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    return (float(values.mean()),
            float(values.std(ddof=1)) if values.size > 1 else 0.0)


def _group(cells, *keys):
    groups = {}
    for cell in cells:
        groups.setdefault(tuple(cell[k] for k in keys), []).append(cell)
    return groups


def _accuracy(cells):
    """Final test accuracy (mean and std over the cells' seeds) and the
    number of diverged runs."""
    mean, std = _spread([c["test_accuracy"] for c in cells])
    return {"seeds": len(cells), "accuracy_mean": mean, "accuracy_std": std,
            "diverged": sum(c["diverged"] for c in cells)}


def _final_rows(label, cells):
    """:func:`_accuracy` per variant and batch size of one sweep, with the
    sweep's ``activation``, ``placement`` and learning rate as a multiple
    of :data:`BASE_LR` (``lr_multiple``)."""
    settings = cells[0]["settings"]
    return [{"sweep": label, "variant": variant, "batch_size": batch_size,
             "activation": settings["activation"],
             "placement": settings["placement"],
             "lr_multiple": round(settings["lr"] / BASE_LR, 6),
             **_accuracy(group)}
            for (variant, batch_size), group in _group(
                cells, "variant", "batch_size").items()]


def _curves(cells):
    """Per checkpoint: accuracy and each percentile, mean and std over
    the seeds that reached it."""
    steps = sorted({p["step"] for c in cells for p in c["curve"]})
    rows = []
    for step in steps:
        points = [p for c in cells for p in c["curve"] if p["step"] == step]
        accuracy = _spread([p["accuracy"] for p in points])
        row = {"step": step, "accuracy_mean": accuracy[0],
               "accuracy_std": accuracy[1]}
        for i, q in enumerate(PERCENTILES):
            row[f"p{q}_mean"], row[f"p{q}_std"] = _spread(
                [p["percentiles"][i] for p in points])
        rows.append(row)
    return rows


def summarize_sigmoid(sweeps):
    """``mnist-sigmoid``: per variant, the mean curves (``curve``), the
    accuracy at a quarter, half and the end of training, and each
    percentile's *drift*: its range ``max_t - min_t`` over the checkpoints
    after the first step (mean and std over seeds)."""
    rows = []
    for (variant,), cells in _group(sweeps[0]["cells"], "variant").items():
        curve = _curves(cells)
        row = {"variant": variant, "curve": curve, **_accuracy(cells)}
        total = cells[0]["settings"]["steps"]
        for name, at in (("quarter", total // 4), ("half", total // 2)):
            near = min(curve, key=lambda r: abs(r["step"] - at))
            row[f"accuracy_{name}"] = near["accuracy_mean"]
            row[f"accuracy_{name}_std"] = near["accuracy_std"]
        later = [[p for p in c["curve"] if p["step"] > 0] for c in cells]
        for i, q in enumerate(PERCENTILES):
            row[f"p{q}_drift_mean"], row[f"p{q}_drift_std"] = _spread(
                [np.ptp([p["percentiles"][i] for p in points])
                 for points in later if points])
        rows.append(row)
    return rows


def summarize_landscape(sweeps):
    """``landscape``: per sweep and variant, over probes after step 0 and
    seeds (``NAME_mean`` and ``NAME_std``: mean and std over seeds of each
    cell's mean over probes; ``NAME_first_mean`` and ``NAME_first_std``:
    of its first probe after step 0): ``loss_range`` (``max_eta L(w - eta g) - min_eta L``),
    ``gradient_change`` (``max_eta ||grad L(w - eta g) - g||``), ``beta``,
    and ``ics`` per dense layer after the first (``l2`` and ``cosine``);
    ``probes``, the per-step means over seeds, for the figure."""
    rows = []
    for one in sweeps:
        for (variant,), cells in _group(one["cells"], "variant").items():
            label = variant if "noise" not in one["label"] else f"{variant} + noise"
            measures = {
                "loss_range": lambda p: max(p["losses"]) - min(p["losses"]),
                "gradient_change": lambda p: max(p["gradient_changes"]),
                "beta": lambda p: p["beta"]}
            layers = sorted({r["layer"] for c in cells for p in c["probes"]
                             for r in p["ics"] if r["layer"] > 0})
            for layer in layers:
                for key in ("l2", "cosine"):
                    measures[f"ics{layer}_{key}"] = (
                        lambda p, layer=layer, key=key: next(
                            r[key] for r in p["ics"] if r["layer"] == layer))
            row = {"variant": label, "sweep": one["label"], "layers": layers,
                   **_accuracy(cells)}
            probed = [[p for p in c["probes"] if p["step"] > 0] for c in cells]
            probed = [probes for probes in probed if probes]
            for name, measure in measures.items():
                row[f"{name}_mean"], row[f"{name}_std"] = _spread(
                    [np.mean([measure(p) for p in probes]) for probes in probed])
                row[f"{name}_first_mean"], row[f"{name}_first_std"] = _spread(
                    [measure(probes[0]) for probes in probed])
            steps = sorted({p["step"] for c in cells for p in c["probes"]})
            row["probes"] = [
                {"step": step, **{name: float(np.mean(
                    [measure(p) for c in cells for p in c["probes"]
                     if p["step"] == step])) for name, measure in measures.items()}}
                for step in steps]
            rows.append(row)
    return rows


def summarize_final(sweeps):
    """``learning-rate`` and ``placement``: accuracy and divergence per
    sweep, variant and batch size."""
    return [row for one in sweeps for row in _final_rows(one["label"], one["cells"])]


#: ``learning-rate`` and ``placement``: the field telling the lines of
#: a table (and figure) apart, the field along its columns (and x axis),
#: and the columns' titles.
FINAL_AXES = {
    "learning-rate": ("activation", "lr_multiple",
                      lambda v: f"lr {v:g}x ({v * BASE_LR:g})"),
    "placement": ("placement", "batch_size", lambda v: f"batch {v}"),
}

SUMMARIES = {"mnist-sigmoid": summarize_sigmoid,
             "learning-rate": summarize_final,
             "landscape": summarize_landscape, "placement": summarize_final}


def _percent(mean, std, diverged=0):
    return f"{100 * mean:.1f} ± {100 * std:.1f}" + (f" ({diverged}!)" if diverged else "")


def print_table(results, stream):
    """The study's table on ``stream``."""
    name, summary = results["study"], results["summary"]
    seeds = results["settings"]["seeds"]
    if name == "mnist-sigmoid":
        steps = results["sweeps"][0]["settings"]["steps"]
        headers = (["variant", f"acc @{steps // 4}", f"acc @{steps // 2}",
                    f"acc @{steps}"]
                   + [f"p{q} drift" for q in PERCENTILES])
        rows = [[r["variant"], _percent(r["accuracy_quarter"], r["accuracy_quarter_std"]),
                 _percent(r["accuracy_half"], r["accuracy_half_std"]),
                 _percent(r["accuracy_mean"], r["accuracy_std"], r["diverged"])]
                + [f"{r[f'p{q}_drift_mean']:.2f} ± {r[f'p{q}_drift_std']:.2f}"
                   for q in PERCENTILES] for r in summary]
        note = ("test accuracy (%) at steps; drift: range (max - min) over "
                "training of the 15/50/85th percentile of a last-hidden-layer "
                "sigmoid input over the test images")
    elif name == "landscape":
        layers = summary[0]["layers"]
        probes = results["sweeps"][0]["cells"][0]["probes"]
        first = next(p["step"] for p in probes if p["step"] > 0)
        headers = (["variant", "accuracy", "probes", "loss range",
                    "grad change", "beta"]
                   + [f"ICS l2 / cos, layer {i + 1}" for i in layers])
        rows = [[r["variant"], _percent(r["accuracy_mean"], r["accuracy_std"],
                                        r["diverged"]) if which == "" else "",
                 f"step {first}" if which else "mean"]
                + [f"{r[f'{k}{which}_mean']:.3g} ± {r[f'{k}{which}_std']:.2g}"
                   for k in ("loss_range", "gradient_change", "beta")]
                + [f"{r[f'ics{i}_l2{which}_mean']:.3g} / "
                   f"{r[f'ics{i}_cosine{which}_mean']:.3f}" for i in layers]
                for r in summary for which in ("_first", "")]
        note = (f"at the first probe (step {first}) and the mean over the "
                f"probes after step 0 (each cell's, then mean ± std over "
                f"seeds); step sizes eta = "
                + ", ".join(f"{m:g}" for m in probes[0]["step_sizes"]))
    else:
        line, column, title = FINAL_AXES[name]
        values = sorted({r[column] for r in summary})
        lines = _group(summary, "variant", line)
        headers = ["variant", line] + [title(v) for v in values]
        rows = [list(key) + [
            next((_percent(r["accuracy_mean"], r["accuracy_std"], r["diverged"])
                  for r in group if r[column] == v), "") for v in values]
            for key, group in lines.items()]
        note = ("final test accuracy (%); (k!): k runs stopped at a "
                "non-finite loss")
    print(f"\n== normkit study {name} ==\n{note}; mean ± std over seeds {seeds}:",
          file=stream)
    print(report.format_table(headers, rows), file=stream)


def run_study(name, out="normkit-results", variants=None, seeds=None,
              batch_sizes=None, steps=None, jobs=1, scheduler=None,
              plots=True, stream=None, progress=True, warm=True):
    """Run the study ``name`` of ``STUDIES``; what ``normkit study
    NAME`` runs.

    Parameters
    ----------
    name : str
        ``"mnist-sigmoid"``, ``"learning-rate"``, ``"landscape"`` or
        ``"placement"``.
    out : path or None
        Output folder (created; finished cells in it are reused); None
        keeps everything in memory.
    variants : sequence of str, optional
        Rows of ``VARIANTS`` or registered schemes (plug-ins included);
        default: ``normkit.analysis.why.dense_variants()``, the rows of
        ``VARIANTS`` that normalize dense features, and ``none``.
    seeds, batch_sizes : sequences of int, optional
        Default: the study's (``STUDIES[name]``).
    steps : int, optional
        Optimizer steps of every run (default: the study's).
    jobs : int
        Worker processes (with ``scheduler="local"``: Dask workers).
    scheduler : str or dask.distributed.Client, optional
        As for :func:`~normkit.analysis.run_sweep`.
    plots : bool
        Write the study's PNG figures into ``out`` (needs matplotlib;
        nothing is written when ``out`` is None).
    stream : file, optional
        Where the table goes (default: stdout); progress goes to stderr.
    progress : bool
    warm : bool
        Fill Numba's on-disk cache from a separate process first, as
        :func:`~normkit.analysis.run_sweep` does (a scheme given to
        :func:`normkit.register` in this program is unknown there: its
        kernels are compiled by the processes that run its cells, and
        worker processes, spawned, do not know it at all: run such a
        scheme with ``jobs=1``, or install it as an entry-point plug-in).

    Returns
    -------
    dict
        What ``results.json`` holds: ``study``, ``settings`` (variants,
        batch sizes, seeds, steps), ``sweeps`` (``label``, ``settings``,
        ``cells``), ``summary`` (the study's summary rows, see
        ``SUMMARIES``), ``elapsed`` (seconds).

    Raises
    ------
    ValueError
        For an unknown ``name`` or variant, or bad ``seeds``,
        ``batch_sizes`` or ``steps`` (the message names the argument).

    Examples
    --------
    A run of two steps, nothing written:

    >>> import io
    >>> from normkit.analysis import run_study
    >>> results = run_study("placement", out=None, variants=["batch_norm"],
    ...                     seeds=[0], batch_sizes=[8], steps=2, plots=False,
    ...                     progress=False, warm=False, stream=io.StringIO())
    >>> [(r["sweep"], r["variant"]) for r in results["summary"]]
    [('before the activation', 'batch_norm'), ('after the activation', 'batch_norm')]
    """
    if name not in STUDIES:
        raise ValueError(f"name: unknown study {name!r}; choose from "
                         f"{', '.join(STUDIES)}")
    study = STUDIES[name]
    variants = check_variants(dense_variants() if variants is None else variants)
    seeds = tuple(study.seeds if seeds is None else seeds)
    batch_sizes = tuple(study.batch_sizes if batch_sizes is None else batch_sizes)
    steps = study.steps if steps is None else steps
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds: expected distinct integers >= 0, got {list(seeds)}")
    if not batch_sizes or min(batch_sizes) < 2:
        raise ValueError(f"batch_sizes: expected integers >= 2, got {list(batch_sizes)}")
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    stream = sys.stdout if stream is None else stream
    start = time.monotonic()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    planned = study.sweeps(variants, steps)
    runs = run_sweeps([(v, s) for _, v, s in planned], batch_sizes, seeds,
                      out, jobs, scheduler, progress, warm=warm)
    sweeps = [{"label": label, "settings": asdict(settings), "cells": cells}
              for (label, _, settings), cells in zip(planned, runs)]
    results = {"study": name,
               "settings": {"variants": list(variants), "seeds": list(seeds),
                            "batch_sizes": list(batch_sizes), "steps": steps},
               "sweeps": sweeps, "summary": SUMMARIES[name](sweeps)}
    results["elapsed"] = time.monotonic() - start
    written = []
    if out is not None:
        sweep.write_atomic(out / "results.json", results)
        written.append(out / "results.json")
        if plots:
            from . import plots as plotting
            written += plotting.plot_study(results, out)
    print_table(results, stream)
    print(f"\nwrote {', '.join(str(p) for p in written) or 'nothing'}; "
          f"elapsed {report.duration(time.monotonic() - start)}", file=stream)
    return results


def _named(name, fields, example):
    """``run_study`` bound to the study ``name``, documented as such."""
    def study(out=f"normkit-results/{name}", **options):
        return run_study(name, out, **options)
    study.__name__ = study.__qualname__ = name.replace("-", "_") + "_study"
    study.__doc__ = f"""{STUDIES[name].about[0].upper() + STUDIES[name].about[1:]}:
    ``normkit study {name}``.

    Parameters
    ----------
    out : path or None
        Output folder (None: write nothing).
    **options
        ``variants``, ``seeds``, ``batch_sizes``, ``steps``, ``jobs``,
        ``scheduler``, ``plots``, ``stream``, ``progress``, ``warm``: as
        for :func:`run_study`.

    Returns
    -------
    dict
        As :func:`run_study`; ``summary`` holds {fields}.

    Examples
    --------
    >>> import io
    >>> from normkit.analysis import {study.__name__}
    >>> results = {study.__name__}(None, variants=["batch_norm"], seeds=[0],
    ...     steps=2, plots=False, progress=False, warm=False,
    ...     stream=io.StringIO())
    >>> {example}
    """
    return study


mnist_sigmoid_study = _named(
    "mnist-sigmoid", "the rows of ``normkit.analysis.why.summarize_sigmoid``",
    "sorted(results['summary'][0])[:3]\n    ['accuracy_half', 'accuracy_half_std', 'accuracy_mean']")
learning_rate_study = _named(
    "learning-rate", "the rows of ``normkit.analysis.why.summarize_final``",
    "[r['sweep'] for r in results['summary']][:3]\n    ['relu, lr 1x', 'relu, lr 5x', 'relu, lr 30x']")
landscape_study = _named(
    "landscape", "the rows of ``normkit.analysis.why.summarize_landscape``",
    "[r['variant'] for r in results['summary']]\n    ['batch_norm', 'batch_norm + noise']")
placement_study = _named(
    "placement", "the rows of ``normkit.analysis.why.summarize_final``",
    "sorted({r['sweep'] for r in results['summary']})\n    ['after the activation', 'before the activation']")
