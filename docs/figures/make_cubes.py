"""Draw what each normalizer reduces over, as SVG (standard library only).

The input of a convolutional layer is drawn as a box of cells with the
channels ``C`` across, the spatial positions ``H, W`` (flattened) up and
the batch ``N`` into the page.  The cells of one statistics group are
filled: they share one mean and one variance.  Run from the repository
root to regenerate the committed figure::

    python docs/figures/make_cubes.py
"""

from pathlib import Path

#: Cells of the box: channels, spatial positions, samples.
C, S, N = 6, 5, 4
#: Size of a cell on the front face, and the offset of one step in N.
CELL_W, CELL_H = 26, 21
DEPTH_X, DEPTH_Y = 13, 10
CHANNELS_PER_GROUP = 2
#: The channel and sample whose group is filled.
CHANNEL, SAMPLE = 2, 0

FILL, EMPTY, STROKE = "#4c72b0", "#ffffff", "#333333"

#: Panel title and the predicate "cell (n, c, s) is in the filled group".
PANELS = (
    ("Batch Norm", lambda n, c, s: c == CHANNEL),
    ("Layer Norm", lambda n, c, s: n == SAMPLE),
    ("Instance Norm", lambda n, c, s: n == SAMPLE and c == CHANNEL),
    ("Group Norm",
     lambda n, c, s: n == SAMPLE and c // CHANNELS_PER_GROUP == CHANNEL // CHANNELS_PER_GROUP),
)

#: Font sizes of the axis labels and panel titles, in the SVG's own units:
#: the figure is drawn at about the size it is shown at (two panels per row
#: in the text column), so these are close to on-screen pixels.
LABEL_SIZE, TITLE_SIZE = 17, 19
#: Panels per row.
COLUMNS = 2

PANEL_W = C * CELL_W + N * DEPTH_X + 110
PANEL_H = S * CELL_H + N * DEPTH_Y + 90


def point(origin, c, s, n):
    """Drawing coordinates of lattice point (c, s, n) of a panel."""
    ox, oy = origin
    return ox + c * CELL_W + n * DEPTH_X, oy - s * CELL_H - n * DEPTH_Y


def polygon(points, filled):
    coords = " ".join(f"{x:g},{y:g}" for x, y in points)
    return (f'<polygon points="{coords}" fill="{FILL if filled else EMPTY}" '
            f'stroke="{STROKE}" stroke-width="0.8"/>')


def text(x, y, label, size=LABEL_SIZE, anchor="middle", italic=False):
    style = ' font-style="italic"' if italic else ""
    return (f'<text x="{x:g}" y="{y:g}" font-family="sans-serif" '
            f'font-size="{size}" text-anchor="{anchor}"{style}>{label}</text>')


def panel(origin, title, in_group):
    """SVG elements of one box: its three visible faces, labels, title."""
    p = lambda c, s, n: point(origin, c, s, n)  # noqa: E731
    parts = []
    for c in range(C):  # front face, n = 0
        for s in range(S):
            parts.append(polygon([p(c, s, 0), p(c + 1, s, 0), p(c + 1, s + 1, 0),
                                  p(c, s + 1, 0)], in_group(0, c, s)))
    for c in range(C):  # top face, s = S
        for n in range(N):
            parts.append(polygon([p(c, S, n), p(c + 1, S, n), p(c + 1, S, n + 1),
                                  p(c, S, n + 1)], in_group(n, c, S - 1)))
    for n in range(N):  # right face, c = C
        for s in range(S):
            parts.append(polygon([p(C, s, n), p(C, s, n + 1), p(C, s + 1, n + 1),
                                  p(C, s + 1, n)], in_group(n, C - 1, s)))
    x0, y0 = p(0, 0, 0)
    x1, _ = p(C, 0, 0)
    _, ytop = p(0, S, 0)
    xn, yn = p(C, 0, N / 2)
    parts += [text((x0 + x1) / 2, y0 + LABEL_SIZE + 4, "C", italic=True),
              text(x0 - 8, (y0 + ytop) / 2 + LABEL_SIZE / 3, "H, W", anchor="end",
                   italic=True),
              text(xn + 10, yn + 8, "N", anchor="start", italic=True),
              text((x0 + x1) / 2 + N * DEPTH_X / 2, y0 + 2 * LABEL_SIZE + 16,
                   title, size=TITLE_SIZE)]
    return parts


def figure():
    """The four panels, ``COLUMNS`` to a row, as one SVG document."""
    rows = -(-len(PANELS) // COLUMNS)
    width, height = PANEL_W * COLUMNS, PANEL_H * rows
    body = []
    for i, (title, in_group) in enumerate(PANELS):
        row, col = divmod(i, COLUMNS)
        body += panel((col * PANEL_W + 60, (row + 1) * PANEL_H - 60), title,
                      in_group)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">\n'
            + "\n".join(body) + "\n</svg>\n")


def main():
    out = Path(__file__).resolve().parent.parent / "_static" / "normalization_cubes.svg"
    out.write_text(figure())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
