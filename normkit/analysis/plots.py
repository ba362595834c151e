"""PNG plots of the study's results (matplotlib, Agg backend; optional).

Each function takes the plain rows the studies return and a file path, and
returns the path it wrote.  Importing this module needs matplotlib (the
``experiments`` extra); nothing else in :mod:`normkit.analysis` does.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def _by(rows, *keys):
    """Rows grouped by the values of ``keys``, in first-seen order."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _log2_axis(axis, sizes, label="batch size"):
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes)
    axis.set_xticklabels([str(s) for s in sizes])
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy(summary, path):
    """Test accuracy (mean, band of ± one standard deviation over seeds, and
    dashed after population re-estimation) against batch size, per variant."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({row["batch_size"] for row in summary})
    for (variant,), rows in _by(summary, "variant").items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        mean = np.array([100 * r["accuracy_mean"] for r in rows])
        std = np.array([100 * r["accuracy_std"] for r in rows])
        line, = axis.plot(x, mean, marker="o", label=variant)
        axis.fill_between(x, mean - std, mean + std, color=line.get_color(),
                          alpha=0.15)
        population = [100 * r["population_mean"] for r in rows]
        if not np.allclose(population, mean):
            axis.plot(x, population, linestyle="--", color=line.get_color(),
                      label=f"{variant}, population stats")
    _log2_axis(axis, sizes)
    axis.set_ylabel("test accuracy (%), inference mode")
    axis.set_title("digits: accuracy against batch size (mean ± std over seeds)")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_estimators(rows, path):
    """Empirical (markers, ± 2 standard errors) against theoretical (lines)
    variance of the batch mean, bias of the biased and unbiased batch
    variance, and variance of the unbiased one, against ``m``."""
    panels = (("mean_var", "Var of batch mean", True),
              ("var_biased_bias", "bias of biased variance", False),
              ("var_unbiased_bias", "bias of unbiased variance", False),
              ("var_unbiased_var", "Var of unbiased variance", True))
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    sizes = sorted({row["m"] for row in rows})
    for axis, (key, title, log) in zip(axes.flat, panels):
        for (distribution,), group in _by(rows, "distribution").items():
            group = sorted(group, key=lambda r: r["m"])
            m = [r["m"] for r in group]
            line, = axis.plot(m, [r[f"{key}_theory"] for r in group],
                              label=distribution)
            axis.errorbar(m, [r[key] for r in group],
                          yerr=[2 * r[f"{key}_se"] for r in group], fmt="o",
                          markersize=4, color=line.get_color())
        _log2_axis(axis, sizes, "m (values per channel in a batch)")
        if log:
            axis.set_yscale("log")
        axis.set_title(title)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("batch statistics: empirical (markers) against theory (lines)")
    return _save(figure, path)


def _curves(axis, rows, keys, value, label):
    """One error-bar curve (± 2 standard errors of ``value``) against batch
    size per distinct ``keys`` of ``rows``; ``label(group_key)`` names it."""
    for key, group in _by(rows, *keys).items():
        group = sorted(group, key=lambda r: r["batch_size"])
        axis.errorbar([r["batch_size"] for r in group], [r[value] for r in group],
                      yerr=[2 * r[f"{value}_se"] for r in group], marker="o",
                      markersize=3, label=label(key))


def plot_mismatch(mismatch, dependence, path):
    """Train/inference mismatch per variant and way of obtaining inference
    statistics, and the batch dependence of one sample's output, against
    batch size."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.set_prop_cycle(color=plt.cm.tab20.colors)
    _curves(left, mismatch, ("variant", "method", "variance"), "mismatch",
            lambda key: key[0] if key[1] == "batch" else f"{key[0]}: {key[1]}, {key[2]}")
    left.set_ylabel("RMS(train-mode output - inference-mode output)")
    left.set_title("train/inference mismatch")
    left.legend(fontsize=6)
    _curves(right, dependence, ("variant",), "change", lambda key: key[0])
    right.set_ylabel("RMS change of sample 0's output")
    right.set_title("batch dependence: rest of the batch replaced")
    right.legend(fontsize=8)
    sizes = sorted({row["batch_size"] for row in mismatch + dependence})
    for axis in (left, right):
        _log2_axis(axis, sizes)
    return _save(figure, path)
