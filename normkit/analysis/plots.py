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


def _panels(n, columns=4, width=3.1, height=2.5):
    """A figure of ``n`` panels (the spare ones hidden) and their axes."""
    columns = min(columns, n)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns,
                                                        height * rows + 0.8),
                                squeeze=False, sharex=True, sharey=True,
                                layout="constrained")
    for axis in axes.flat[n:]:
        axis.set_visible(False)
    for axis in axes.flat[:n]:
        axis.tick_params(labelbottom=True, labelleft=True)
        axis.grid(alpha=0.3)
    return figure, list(axes.flat[:n])


def _legend_below(figure, handles, labels, ncol=4):
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=ncol, fontsize=9, frameon=False)


def plot_sigmoid(results, out):
    """``mnist-sigmoid``: test accuracy against steps (``accuracy.png``),
    one panel per variant with no normalization in grey for reference,
    and the 15/50/85th percentiles of the sigmoid input
    (``percentiles.png``), one panel per variant; bands: ± one standard
    deviation over seeds."""
    rows = results["summary"]
    reference = next((r for r in rows if r["variant"] == "none"), None)
    written = []
    for name, keys, ylabel in (
            ("accuracy.png", ("accuracy",), "test accuracy (%)"),
            ("percentiles.png", tuple(f"p{q}" for q in (15, 50, 85)),
             "sigmoid input")):
        figure, axes = _panels(len(rows))
        scale = 100 if keys == ("accuracy",) else 1
        for axis, row in zip(axes, rows):
            steps = [p["step"] for p in row["curve"]]
            if reference is not None and row is not reference:
                for key in keys:
                    axis.plot([p["step"] for p in reference["curve"]],
                              [scale * p[f"{key}_mean"] for p in reference["curve"]],
                              color="#bbbbbb", linewidth=2.5, zorder=1)
            for index, key in enumerate(keys):
                mean = np.array([scale * p[f"{key}_mean"] for p in row["curve"]])
                std = np.array([scale * p[f"{key}_std"] for p in row["curve"]])
                axis.plot(steps, mean, color=color(row["variant"]),
                          linestyle=STYLES[index % len(STYLES)], zorder=3)
                axis.fill_between(steps, mean - std, mean + std, alpha=0.2,
                                  color=color(row["variant"]), linewidth=0)
            axis.set_title(row["variant"], color=color(row["variant"]), fontsize=10)
            axis.set_xlabel("training step")
        for axis in axes[::4]:
            axis.set_ylabel(ylabel)
        if keys == ("accuracy",):
            axes[0].set_ylim(max(0, min(scale * p["accuracy_mean"] for r in rows
                                        for p in r["curve"][1:]) - 5), 100)
        handles = [plt.Line2D([], [], color="black", linestyle=STYLES[i])
                   for i in range(len(keys))]
        labels = ([f"{q}th percentile" for q in (15, 50, 85)]
                  if len(keys) > 1 else ["mean over seeds"])
        handles += [plt.Line2D([], [], color="#bbbbbb", linewidth=2.5),
                    plt.Rectangle((0, 0), 1, 1, color="#888888", alpha=0.3)]
        labels += ["none (no normalization), for reference",
                   "± 1 std over seeds"]
        _legend_below(figure, handles, labels, ncol=3)
        figure.suptitle("MNIST, 3 x 100 sigmoid units, batch 60: "
                        + ("test accuracy" if len(keys) == 1 else
                           "the input of one sigmoid of the last hidden layer "
                           "(unit 0) over the test images"))
        written.append(_save(figure, out / name))
    return written


def plot_final(results, out):
    """``learning-rate`` and ``placement``: final test accuracy, one panel
    per variant, a line per activation (or placement) against the
    learning-rate multiple (or the batch size), ± one standard deviation
    over seeds; a red cross marks settings where a run diverged."""
    from .why import FINAL_AXES
    rows = results["summary"]
    learning = results["study"] == "learning-rate"
    line_key, x_key, _ = FINAL_AXES[results["study"]]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = list(dict.fromkeys(r[line_key] for r in rows))
    ticks = sorted({r[x_key] for r in rows})
    figure, axes = _panels(len(variants))
    for axis, variant in zip(axes, variants):
        for index, line in enumerate(lines):
            group = sorted((r for r in rows if r["variant"] == variant
                            and r[line_key] == line), key=lambda r: r[x_key])
            xs = [r[x_key] for r in group]
            axis.errorbar(xs, [100 * r["accuracy_mean"] for r in group],
                          yerr=[100 * r["accuracy_std"] for r in group],
                          color=color(variant), linestyle=STYLES[index],
                          marker=MARKERS[index], markersize=4, capsize=2)
            bad = [r for r in group if r["diverged"]]
            axis.plot([r[x_key] for r in bad],
                      [100 * r["accuracy_mean"] for r in bad],
                      linestyle="none", marker="x", color="red",
                      markersize=9, markeredgewidth=2)
        axis.set_title(variant, color=color(variant), fontsize=10)
        axis.set_xscale("log")
        axis.set_xticks(ticks)
        axis.set_xticklabels([f"{t:g}" + ("x" if learning else "") for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("learning rate (x base)" if learning else "batch size")
    # one scale for all panels, down to the lowest band
    low = min(100 * (r["accuracy_mean"] - r["accuracy_std"]) for r in rows)
    axes[0].set_ylim(max(0.0, 5 * np.floor(low / 5) - 5), 100)
    for axis in axes[::4]:
        axis.set_ylabel("final test accuracy (%)")
    handles = [plt.Line2D([], [], color="black", linestyle=STYLES[i],
                          marker=MARKERS[i]) for i in range(len(lines))]
    labels = [f"{line} the activation" if line_key == "placement" else line
              for line in lines]
    if any(r["diverged"] for r in rows):
        handles.append(plt.Line2D([], [], linestyle="none", marker="x",
                                  color="red", markeredgewidth=2))
        labels.append("a run diverged (non-finite loss)")
    _legend_below(figure, handles, labels, ncol=len(handles))
    figure.suptitle("MNIST, 3 x 100 units: final test accuracy, mean ± std "
                    "over seeds")
    return [_save(figure, out / ("learning_rate.png" if learning
                                 else "placement.png"))]


def plot_landscape(results, out):
    """``landscape``: along training, the loss range, the gradient change
    and the effective beta-smoothness along the gradient
    (``landscape.png``), and internal covariate shift, ``l2`` and
    cosine, per dense layer after the first (``ics.png``); one line per
    variant (means over seeds; the noisy-BatchNorm control dashed)."""
    rows = results["summary"]

    def draw(axis, row, key):
        steps = [p["step"] for p in row["probes"] if p["step"] > 0]
        axis.plot(steps, [p[key] for p in row["probes"] if p["step"] > 0],
                  color=color(row["variant"].split(" + ")[0]), marker="o",
                  markersize=3, linestyle="--" if "noise" in row["variant"] else "-",
                  linewidth=2.5 if row["variant"] in ("none", "batch_norm") else 1.2)

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for axis, (key, title) in zip(axes, (
            ("loss_range", "loss range along the gradient\nmax - min of L(w - eta g)"),
            ("gradient_change", "gradient predictiveness\nmax ||grad L(w - eta g) - g||"),
            ("beta", "effective beta-smoothness\nmax ||grad L(w - eta g) - g|| / ||eta g||"))):
        for row in rows:
            draw(axis, row, key)
        axis.set_yscale("log")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=color(r["variant"].split(" + ")[0]),
                          linestyle="--" if "noise" in r["variant"] else "-")
               for r in rows]
    _legend_below(figure, handles, [r["variant"] for r in rows])
    figure.suptitle("MNIST, 3 x 100 ReLU, batch 60: the landscape along the "
                    "gradient at each probe (means over seeds)")
    written = [_save(figure, out / "landscape.png")]
    layers = rows[0]["layers"]
    figure, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6.5),
                                squeeze=False, layout="constrained")
    for column, layer in enumerate(layers):
        for line, (key, label) in enumerate((("l2", "||G - G'||"),
                                             ("cosine", "cos(G, G')"))):
            axis = axes[line, column]
            for row in rows:
                draw(axis, row, f"ics{layer}_{key}")
            if key == "l2":
                axis.set_yscale("log")
            axis.set_title(f"dense layer {layer + 1}", fontsize=10)
            axis.set_ylabel(f"ICS: {label}" + (", log scale" if key == "l2" else ""))
            axis.set_xlabel("training step")
            axis.grid(alpha=0.3)
    _legend_below(figure, handles, [r["variant"] for r in rows])
    figure.suptitle("Internal covariate shift (Santurkar et al. 2018, "
                    "Definition 2.1): a layer's weight gradient G before,\nand "
                    "G' after, the layers below it take the step's update "
                    "(means over seeds)")
    written.append(_save(figure, out / "ics.png"))
    return written


def plot_study(results, out):
    """The figures of a study of :mod:`normkit.analysis.why` into the
    folder ``out``; returns their paths."""
    from pathlib import Path
    out = Path(out)
    if results["study"] == "mnist-sigmoid":
        return plot_sigmoid(results, out)
    if results["study"] == "landscape":
        return plot_landscape(results, out)
    return plot_final(results, out)
