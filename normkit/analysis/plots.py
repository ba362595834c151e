"""PNG plots of the study's results (matplotlib, Agg backend; optional).

Each function takes the plain rows the studies return and a file path, and
returns the path it wrote.  Importing this module needs matplotlib (the
``experiments`` extra); nothing else in :mod:`normkit.analysis` does.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


#: One colour per variant, the same in every figure.
COLORS = {
    "none": "#7f7f7f",
    "batch_norm": "#1f77b4",
    "batch_renorm": "#17becf",
    "ghost_batch_norm": "#9467bd",
    "group_norm": "#d62728",
    "layer_norm": "#2ca02c",
    "instance_norm": "#ff7f0e",
    "rms_norm": "#8c564b",
}

#: Line style per sweep of a study (fixed epochs, fixed steps, ...).
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def color(variant):
    """The colour of ``variant`` (a registered scheme not in :data:`COLORS`
    gets black)."""
    return COLORS.get(variant, "#000000")


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
    axis.minorticks_off()
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)


def _save(figure, path, legend=None):
    figure.savefig(path, dpi=100, bbox_inches="tight",
                   bbox_extra_artists=[legend] if legend is not None else None)
    plt.close(figure)
    return path


def _grid(n, width=3.2, height=2.6, columns=4):
    columns = min(columns, n)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns,
                                                        height * rows + 0.6),
                                sharex=True, sharey=True, squeeze=False)
    for axis in axes.flat[n:]:
        axis.set_visible(False)
    return figure, axes.flat


def plot_accuracy(sweeps, path):
    """Test error (mean, band of ± one standard deviation over seeds) against
    batch size, one panel per variant and one line style per sweep (fixed
    epochs, fixed steps, ...); after population re-estimation as hollow
    markers where it differs.  BatchNorm's first sweep is repeated in grey
    in every other panel, for reference.  ``sweeps`` is ``results["sweeps"]``
    (a list of dicts with ``label`` and ``summary``)."""
    summaries = [one["summary"] for one in sweeps]
    variants = list(dict.fromkeys(r["variant"] for s in summaries for r in s))
    sizes = sorted({r["batch_size"] for s in summaries for r in s})
    figure, axes = _grid(len(variants))
    handles = {}

    def curve(rows, key):
        rows = sorted(rows, key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        mean = np.array([100 * (1 - r[f"{key}_mean"]) for r in rows])
        std = np.array([100 * r[f"{key}_std"] for r in rows])
        return x, mean, std

    reference = _by(summaries[0], "variant").get(("batch_norm",))
    for axis, variant in zip(axes, variants):
        if reference and variant != "batch_norm":
            x, mean, _ = curve(reference, "accuracy")
            handles["reference"], = axis.plot(
                x, mean, color="#bbbbbb", linewidth=2.5, zorder=1,
                label=f"batch_norm, {sweeps[0]['label']}")
        for index, one in enumerate(sweeps):
            rows = [r for r in one["summary"] if r["variant"] == variant]
            if not rows:
                continue
            x, mean, std = curve(rows, "accuracy")
            line, = axis.plot(x, mean, color=color(variant),
                              linestyle=STYLES[index % len(STYLES)],
                              marker=MARKERS[index % len(MARKERS)],
                              markersize=4, zorder=3)
            axis.fill_between(x, mean - std, mean + std, color=color(variant),
                              alpha=0.15, linewidth=0, zorder=2)
            handles.setdefault(("sweep", index), (
                plt.Line2D([], [], color="black",
                           linestyle=STYLES[index % len(STYLES)],
                           marker=MARKERS[index % len(MARKERS)], markersize=4),
                one["label"]))
            if any(r["population_reestimated"] for r in rows):
                _, population, _ = curve(rows, "population")
                if not np.allclose(population, mean):
                    axis.plot(x, population, linestyle="none",
                              marker=MARKERS[index % len(MARKERS)],
                              markerfacecolor="white", color=color(variant),
                              markersize=5, zorder=4)
                    handles["population"] = (plt.Line2D(
                        [], [], linestyle="none", marker="o",
                        markerfacecolor="white", color="black"),
                        "after population re-estimation")
        axis.set_title(variant, color=color(variant), fontsize=10)
        _log2_axis(axis, sizes)
        axis.tick_params(labelbottom=True)
    for axis in list(axes)[::min(4, len(variants))]:
        axis.set_ylabel("test error (%)")
    entries = [h for k, h in handles.items() if k != "reference"
               and k != "population"]
    items = [(h, label) for h, label in entries]
    if "population" in handles:
        items.append(handles["population"])
    if "reference" in handles:
        items.append((handles["reference"], handles["reference"].get_label()))
    items.append((plt.Rectangle((0, 0), 1, 1, color="#888888", alpha=0.3),
                  "± 1 std over seeds"))
    legend = figure.legend([h for h, _ in items], [t for _, t in items],
                           loc="upper center", bbox_to_anchor=(0.5, 0.0),
                           ncol=min(3, len(items)), fontsize=8, frameon=False)
    figure.suptitle("Test error against batch size, inference mode "
                    "(mean over seeds)")
    figure.tight_layout()
    return _save(figure, path, legend)


def plot_estimators(rows, path):
    """Empirical (markers, ± 2 standard errors) against theoretical (lines)
    variance of the batch mean, bias of the biased and unbiased batch
    variance, and variance of the unbiased one, against ``m``."""
    panels = (("mean_var", "Var of batch mean", True, "Var(mu_B)"),
              ("var_biased_bias", "bias of biased variance", False,
               "E[sigma_B^2] - sigma^2"),
              ("var_unbiased_bias", "bias of unbiased variance", False,
               "E[s_B^2] - sigma^2"),
              ("var_unbiased_var", "Var of unbiased variance", True,
               "Var(s_B^2)"))
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    sizes = sorted({row["m"] for row in rows})
    for axis, (key, title, log, ylabel) in zip(axes.flat, panels):
        groups = _by(rows, "distribution")
        for index, ((distribution,), group) in enumerate(groups.items()):
            group = sorted(group, key=lambda r: r["m"])
            m = np.array([r["m"] for r in group], dtype=float)
            # distributions with the same theory would hide each other:
            # a line style each, and the markers nudged sideways
            line, = axis.plot(m, [r[f"{key}_theory"] for r in group],
                              label=distribution,
                              linestyle=STYLES[index % len(STYLES)])
            nudge = 2.0 ** (0.06 * (index - (len(groups) - 1) / 2))
            axis.errorbar(m * nudge, [r[key] for r in group],
                          yerr=[2 * r[f"{key}_se"] for r in group],
                          fmt=MARKERS[index % len(MARKERS)], markersize=4,
                          color=line.get_color())
        _log2_axis(axis, sizes, "m (values per channel in a batch)")
        if log:
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_ylabel(ylabel)
    figure.suptitle("batch statistics: empirical (markers, ± 2 standard "
                    "errors) against theory (lines)")
    figure.tight_layout()
    legend = figure.legend(*axes.flat[0].get_legend_handles_labels(),
                           loc="upper center", bbox_to_anchor=(0.5, 0.0),
                           ncol=4, fontsize=9, frameon=False,
                           title="distribution of the values in a batch")
    return _save(figure, path, legend)


METHOD_STYLES = {"ema": "-", "cumulative": ":", "population": "--"}
VARIANCE_MARKERS = {"unbiased": "o", "biased": "x"}


def plot_mismatch(mismatch, dependence, path):
    """Train/inference mismatch against batch size, one panel per variant
    with running statistics (a line style per way of obtaining inference
    statistics, a marker per variance estimate, ± 2 standard errors), and
    the batch dependence of one sample's output in a last panel; variants
    at exactly zero are named in their panel instead of drawn on the axis."""
    with_stats = list(dict.fromkeys(r["variant"] for r in mismatch
                                    if r["method"] != "batch"))
    without = list(dict.fromkeys(r["variant"] for r in mismatch
                                 if r["method"] == "batch"))
    sizes = sorted({row["batch_size"] for row in mismatch + dependence})
    n = len(with_stats) + 1
    columns = min(n, 3)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns,
                                                        3.3 * rows + 0.6),
                                squeeze=False)
    axes = list(axes.flat)
    for axis in axes[n:]:
        axis.set_visible(False)
    top = max([r["mismatch"] + 2 * r["mismatch_se"] for r in mismatch] + [0.0])
    for axis, variant in zip(axes, with_stats):
        for (method, variance), group in _by(
                [r for r in mismatch if r["variant"] == variant],
                "method", "variance").items():
            group = sorted(group, key=lambda r: r["batch_size"])
            axis.errorbar([r["batch_size"] for r in group],
                          [r["mismatch"] for r in group],
                          yerr=[2 * r["mismatch_se"] for r in group],
                          color=color(variant),
                          linestyle=METHOD_STYLES.get(method, "-."),
                          marker=VARIANCE_MARKERS.get(variance, "s"),
                          markersize=4, label=f"{method}, {variance} variance")
        axis.set_title(f"{variant}: train/inference mismatch",
                       color=color(variant), fontsize=10)
        axis.set_ylabel("RMS(train - inference output)")
        axis.set_ylim(0, 1.05 * top if top > 0 else 1)
        _log2_axis(axis, sizes)
    if with_stats:
        legend_axis = axes[0]
        handles = [plt.Line2D([], [], color="black", linestyle=style,
                              label=f"inference statistics: {method}")
                   for method, style in METHOD_STYLES.items()]
        handles += [plt.Line2D([], [], color="black", linestyle="none",
                               marker=marker, label=f"{variance} variance")
                    for variance, marker in VARIANCE_MARKERS.items()]
    last = axes[n - 1]
    moving = [v for (v,), g in _by(dependence, "variant").items()
              if any(r["change"] > 0 for r in g)]
    still = [v for (v,), g in _by(dependence, "variant").items() if v not in moving]
    for variant in moving:
        group = sorted([r for r in dependence if r["variant"] == variant],
                       key=lambda r: r["batch_size"])
        last.errorbar([r["batch_size"] for r in group], [r["change"] for r in group],
                      yerr=[2 * r["change_se"] for r in group], marker="o",
                      markersize=3, color=color(variant), label=variant)
    if still:
        last.text(0.97, 0.95, "exactly 0 at every batch size:\n"
                  + "\n".join(still), transform=last.transAxes, ha="right",
                  va="top", fontsize=8,
                  bbox=dict(facecolor="white", edgecolor="#cccccc"))
    if moving:
        last.legend(fontsize=8, loc="upper left", frameon=False)
    last.set_title("batch dependence: rest of the batch replaced", fontsize=10)
    last.set_ylabel("RMS change of sample 0's output")
    _log2_axis(last, sizes)
    note = ("no running statistics (inference uses the input's own, mismatch "
            "0): " + ", ".join(without)) if without else ""
    figure.suptitle("Train/inference mismatch on synthetic conv features, and "
                    "batch dependence (± 2 standard errors)")
    figure.tight_layout()
    legend = None
    if with_stats:
        legend = figure.legend(handles=handles, loc="upper center",
                               bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8,
                               frameon=False, title=note or None,
                               title_fontsize=8)
    elif note:
        figure.text(0.5, -0.02, note, ha="center", fontsize=8)
    return _save(figure, path, legend)
