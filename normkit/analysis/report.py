"""Summaries and text tables of the study's results (no plotting here)."""

import sys
import time

import numpy as np


def summarize(cells):
    """Test accuracy per ``(variant, batch_size)`` over seeds.

    Returns
    -------
    list of dict
        ``variant``, ``batch_size``, ``seeds``, ``accuracy_mean``,
        ``accuracy_std`` (sample standard deviation over seeds, 0 for one
        seed), ``accuracy_min``, ``accuracy_max``, ``population_mean``,
        ``population_std`` (after population re-estimation),
        ``population_reestimated`` (the variant keeps running statistics)
        and
        ``diverged`` (runs stopped by a non-finite loss), in first-seen
        order.
    """
    groups = {}
    for cell in cells:
        groups.setdefault((cell["variant"], cell["batch_size"]), []).append(cell)
    rows = []
    for (variant, batch_size), members in groups.items():
        accuracy = np.array([c["test_accuracy"] for c in members])
        population = np.array([c["test_accuracy_population"] for c in members])
        spread = (lambda a: float(a.std(ddof=1)) if a.size > 1 else 0.0)
        rows.append({"variant": variant, "batch_size": batch_size,
                     "seeds": len(members),
                     "accuracy_mean": float(accuracy.mean()),
                     "accuracy_std": spread(accuracy),
                     "accuracy_min": float(accuracy.min()),
                     "accuracy_max": float(accuracy.max()),
                     "population_mean": float(population.mean()),
                     "population_std": spread(population),
                     "population_reestimated": any(
                         c["population_reestimated"] for c in members),
                     "diverged": sum(bool(c["diverged"]) for c in members)})
    return rows


def format_table(headers, rows):
    """Plain-text table, columns padded to their widest entry."""
    widths = [max(len(str(v)) for v in column) for column in zip(headers, *rows)]
    line = lambda values: "  ".join(str(v).rjust(w) for v, w in zip(values, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])]
                     + [line(row) for row in rows])


def grid_table(rows, row_keys, cell):
    """Text table with one line per distinct ``row_keys`` of ``rows`` (in
    first-seen order) and one column per batch size; ``cell(row)`` is the
    text of an entry."""
    lines = list(dict.fromkeys(tuple(row[k] for k in row_keys) for row in rows))
    sizes = sorted({row["batch_size"] for row in rows})
    found = {(tuple(row[k] for k in row_keys), row["batch_size"]): row
             for row in rows}
    table = [list(line) + [cell(found[line, size]) if (line, size) in found
                           else "" for size in sizes] for line in lines]
    return format_table(list(row_keys) + [f"batch {s}" for s in sizes], table)


def accuracy_cell(key):
    """Entry of an accuracy table: ``mean ± std`` in % of ``key``
    (``accuracy`` or ``population``); ``!`` marks diverged runs."""
    def cell(row):
        mark = "!" if row["diverged"] else ""
        return (f"{100 * row[key + '_mean']:.1f} ± "
                f"{100 * row[key + '_std']:.1f}{mark}")
    return cell


class ProgressBar:
    """A one-line progress bar on ``stream`` (stderr by default).

    On a terminal the line is redrawn in place; otherwise a line is written
    at each tenth of the way, so logs stay short.  Cells reused from an
    earlier run advance the bar but not the clock: the estimate of the time
    left is the time per computed cell since :meth:`begin` (the first cell
    started), and it appears only once ``eta_after`` cells have been
    computed (before that there is nothing to base it on).
    """

    def __init__(self, total, label="cells", stream=None, width=28,
                 eta_after=1):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.eta_after = max(int(eta_after), 1)
        self.done = 0
        self.computed = 0
        self.start = time.monotonic()
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self._last_tenth = -1

    def begin(self):
        """The computed cells start now (after any warm-up)."""
        self.start = time.monotonic()

    def update(self, count=1, note="", reused=False):
        """Advance by ``count`` and redraw with an optional ``note``."""
        self.done = min(self.total, self.done + count)
        if not reused:
            self.computed += count
        tenth = 10 * self.done // self.total
        if not self.interactive and tenth == self._last_tenth:
            return
        self._last_tenth = tenth
        elapsed = time.monotonic() - self.start
        fill = self.width * self.done // self.total
        left = ""
        if self.computed >= self.eta_after and self.done < self.total:
            left = (f", ~{_duration(elapsed / self.computed * (self.total - self.done))}"
                    f" left")
        text = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/"
                f"{self.total} {self.label}, {_duration(elapsed)}{left}"
                f"{'  ' + note if note else ''}")
        self.stream.write(text.ljust(79) + "\r" if self.interactive
                          else text + "\n")
        self.stream.flush()

    def close(self):
        """End the line of an interactive bar."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def norm_extents(settings, batch_sizes, image_size):
    """Where BatchNorm's ``m`` (values per channel it normalizes over)
    gets small: one row per normalized layer of the study's network,
    ``layer``, ``features`` (``C x H x W`` or ``F``) and ``m`` at each
    batch size (``N * H * W``; ``N`` for a dense layer)."""
    from . import trainer
    if settings["network"] == "conv":
        layers = [(f"conv {i + 1}" + (f" (stride {stride})" if stride > 1 else ""),
                   f"{out} x {size} x {size}", size * size)
                  for i, (_, out, stride, size) in enumerate(trainer.conv_stages(
                      image_size, settings["last_stage"], settings["width"]))]
    else:
        layers = [("conv 1", f"{settings['width']} x {image_size} x {image_size}",
                   image_size * image_size),
                  ("dense 1", f"{settings['hidden']}", 1)]
    return [{"layer": name, "features": features,
             **{f"batch {n}": n * extent for n in batch_sizes}}
            for name, features, extent in layers]


def duration(seconds):
    """``"2m05s"`` (or ``"45s"``) for a number of seconds."""
    return _duration(seconds)


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
