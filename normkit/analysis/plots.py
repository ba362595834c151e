"""PNG plots of the study's results (matplotlib, Agg backend; optional).

Each function takes the plain rows the studies return and a file path, and
returns the path it wrote.  Importing this module needs matplotlib (the
``experiments`` extra); nothing else in :mod:`normkit.analysis` does.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


#: One colour per variant, the same in every figure.
COLORS = {
    "none": "#333333",      # dark: the grey is BatchNorm's reference line
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
    # the tight box takes in figure legends and titles by itself
    figure.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.2)
    plt.close(figure)
    return path


def plot_accuracy(sweeps, path, columns=4):
    """Test error (mean, band of ± one standard deviation over seeds)
    against batch size: one block of panels per sweep (fixed epochs, fixed
    steps, ...), each with its own error scale, and one panel per variant
    in its colour; hollow markers after population re-estimation where it
    differs; BatchNorm of the same sweep in grey in every other panel, for
    reference.  ``sweeps`` is ``results["sweeps"]`` (dicts with ``label``
    and ``summary``)."""
    variants = list(dict.fromkeys(r["variant"] for one in sweeps
                                  for r in one["summary"]))
    sizes = sorted({r["batch_size"] for one in sweeps for r in one["summary"]})
    columns = min(columns, len(variants))
    rows = -(-len(variants) // columns)
    figure = plt.figure(figsize=(3.1 * columns,
                                 len(sweeps) * (2.5 * rows + 0.5)),
                        layout="constrained")
    blocks = figure.subfigures(len(sweeps), 1, squeeze=False)[:, 0]
    legend_items = {}

    def curve(group, key):
        group = sorted(group, key=lambda r: r["batch_size"])
        return ([r["batch_size"] for r in group],
                np.array([100 * (1 - r[f"{key}_mean"]) for r in group]),
                np.array([100 * r[f"{key}_std"] for r in group]))

    for index, (block, one) in enumerate(zip(blocks, sweeps)):
        axes = block.subplots(rows, columns, sharex=True, sharey=True,
                              squeeze=False)
        by_variant = _by(one["summary"], "variant")
        marker = MARKERS[index % len(MARKERS)]
        for axis in axes.flat[len(variants):]:
            axis.set_visible(False)
        for axis, variant in zip(axes.flat, variants):
            reference = by_variant.get(("batch_norm",))
            if reference and variant != "batch_norm":
                x, mean, _ = curve(reference, "accuracy")
                legend_items["reference"] = (axis.plot(
                    x, mean, color="#bbbbbb", linewidth=2.5, zorder=1)[0],
                    "batch_norm (same sweep), for reference")
            group = by_variant.get((variant,), [])
            if group:
                x, mean, std = curve(group, "accuracy")
                axis.plot(x, mean, color=color(variant), marker=marker,
                          markersize=4, zorder=3)
                axis.fill_between(x, mean - std, mean + std,
                                  color=color(variant), alpha=0.2,
                                  linewidth=0, zorder=2)
                if any(r["population_reestimated"] for r in group):
                    _, population, _ = curve(group, "population")
                    if not np.allclose(population, mean):
                        axis.plot(x, population, linestyle="none",
                                  marker=marker, markerfacecolor="white",
                                  color=color(variant), markersize=5, zorder=4)
                        legend_items["population"] = (plt.Line2D(
                            [], [], linestyle="none", marker="o",
                            markerfacecolor="white", color="black"),
                            "after population re-estimation")
            axis.set_title(variant, color=color(variant), fontsize=10)
            _log2_axis(axis, sizes)
            axis.tick_params(labelbottom=True, labelleft=True)
        errors = [100 * (1 - r[f"{key}_mean"]) for r in one["summary"]
                  for key in ("accuracy", "population")]
        log = min(errors) > 0 and max(errors) > 4 * min(errors)
        for axis in axes[:, 0]:
            axis.set_ylabel("test error (%)" + (", log scale" if log else ""))
        if log:   # 1 % against 2 % stays visible next to a collapse to 30 %
            axes[0, 0].set_yscale("log")
            low, high = 0.8 * min(errors), 1.25 * max(errors)
            ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
                     if low <= t <= high]
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            for axis in axes.flat:
                axis.set_yticks(ticks)
                axis.yaxis.set_major_formatter(plain)
                axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        block.suptitle(one["label"], fontsize=11)
    legend_items["band"] = (plt.Rectangle((0, 0), 1, 1, color="#888888",
                                          alpha=0.3), "± 1 std over seeds")
    legend = figure.legend([h for h, _ in legend_items.values()],
                           [t for _, t in legend_items.values()],
                           loc="upper center", bbox_to_anchor=(0.5, 0.0),
                           ncol=3, fontsize=9, frameon=False)
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
    zero = 1e-6      # below this a mismatch or change counts as none
    stats = list(dict.fromkeys(r["variant"] for r in mismatch
                               if r["method"] != "batch"))
    with_stats = [v for v in stats if any(
        r["mismatch"] > zero for r in mismatch if r["variant"] == v)]
    at_zero = [v for v in stats if v not in with_stats]
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
              if any(r["change"] > zero for r in g)]
    still = [v for (v,), g in _by(dependence, "variant").items() if v not in moving]
    for variant in moving:
        group = sorted([r for r in dependence if r["variant"] == variant],
                       key=lambda r: r["batch_size"])
        last.errorbar([r["batch_size"] for r in group], [r["change"] for r in group],
                      yerr=[2 * r["change_se"] for r in group], marker="o",
                      markersize=3, color=color(variant), label=variant)
    if still:
        last.text(0.97, 0.95, "0 (below 1e-6) at every batch size:\n"
                  + "\n".join(still), transform=last.transAxes, ha="right",
                  va="top", fontsize=8,
                  bbox=dict(facecolor="white", edgecolor="#cccccc"))
    if moving:
        last.legend(fontsize=8, loc="upper left", frameon=False)
    last.set_title("batch dependence: rest of the batch replaced", fontsize=10)
    last.set_ylabel("RMS change of sample 0's output")
    _log2_axis(last, sizes)
    notes = []
    if without:
        notes.append("no running statistics (inference uses the input's "
                      "own, mismatch 0): " + ", ".join(without))
    if at_zero:
        notes.append("running statistics, mismatch below 1e-6 at every batch size "
                     "(training output = inference output): "
                     + ", ".join(at_zero))
    note = "\n".join(notes)
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
