"""Progress that tells the truth: compiling said only when it happens, an
ETA only once cells have been computed, reused cells not counted as work."""

import io

from normkit.analysis._compiling import announce_compilation
from normkit.analysis import report


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_eta_appears_only_after_the_first_computed_cells(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(report.time, "monotonic", clock)
    stream = io.StringIO()
    bar = report.ProgressBar(10, stream=stream, eta_after=2)
    clock.now = 100.0               # a long warm-up (compiling) ...
    bar.begin()                     # ... is not part of the cells' time
    for _ in range(3):              # reused cells: no work done, no ETA
        bar.update(reused=True)
    clock.now = 110.0
    bar.update()                    # one computed cell: still no ETA
    clock.now = 120.0
    bar.update()                    # two: 10 s each, 5 cells left
    lines = stream.getvalue().splitlines()
    assert not any("left" in line for line in lines[:-1])
    assert lines[-1].startswith("[") and "5/10 cells, 20s, ~50s left" in lines[-1]


def test_no_eta_once_done_and_duration_format():
    stream = io.StringIO()
    bar = report.ProgressBar(1, stream=stream)
    bar.update()
    assert "left" not in stream.getvalue() and "1/1 cells" in stream.getvalue()
    assert report.duration(125) == "2m05s" and report.duration(45) == "45s"


def test_compilation_is_announced_once_and_only_when_it_happens():
    import numba

    @numba.njit(cache=False)
    def twice(x):
        return 2 * x

    stream = io.StringIO()
    with announce_compilation("compiling...", stream) as listener:
        assert twice(1) == 2                 # compiles: announced
        assert twice(2) == 4                 # compiled: silent
        assert twice(1.5) == 3.0             # a new signature compiles again
    assert stream.getvalue() == "compiling...\n"
    assert listener.compiled >= 2
    with announce_compilation("compiling...", stream) as listener:
        twice(3)
    assert listener.compiled == 0 and stream.getvalue() == "compiling...\n"
    twice(4.5)                               # the listener is gone
