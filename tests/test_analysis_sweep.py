"""The training sweep: resumable, atomic cells, identical reruns."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

from normkit.analysis import Settings, run_sweep, sweep  # noqa: E402

VARIANTS = ("batch_norm", "group_norm")
SIZES = (8, 32)
SEEDS = (0, 1)
TINY = Settings(epochs=1)


@pytest.fixture
def counted(monkeypatch):
    """Count the cells actually trained (in this process)."""
    calls = []
    real = sweep.train_cell

    def counting(variant, batch_size, seed, settings):
        calls.append((variant, batch_size, seed))
        return real(variant, batch_size, seed, settings)

    monkeypatch.setattr(sweep, "train_cell", counting)
    return calls


@pytest.fixture(scope="module")
def reference():
    """The sweep run straight through, without a folder.

    The sweeps of this module that run in this process pass ``warm=False``:
    this process compiled its kernels long before, so filling the on-disk
    cache would not change what it runs.
    """
    return run_sweep(VARIANTS, SIZES, SEEDS, TINY, warm=False)


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, counted,
                                                       reference):
    finished = []

    def interrupt_after_three(cell, reused):
        finished.append(cell)
        if len(finished) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(VARIANTS, SIZES, SEEDS, TINY, tmp_path, warm=False,
                  on_cell=interrupt_after_three)
    files = sorted((tmp_path / "cells").iterdir())
    assert len(files) == 3 and len(counted) == 3
    assert all(not f.name.startswith(".tmp") for f in files)

    events = []
    cells = run_sweep(VARIANTS, SIZES, SEEDS, TINY, tmp_path, warm=False,
                      on_cell=lambda cell, reused: events.append(reused))
    assert events.count(True) == 3 and events.count(False) == 5
    assert len(counted) == 8 and len(set(counted)) == 8      # none twice
    assert cells == reference
    assert json.loads(files[0].read_text()) in reference


def test_changed_settings_do_not_reuse_cells(tmp_path, counted):
    run_sweep(("batch_norm",), (32,), (0,), TINY, tmp_path, warm=False)
    run_sweep(("batch_norm",), (32,), (0,), TINY, tmp_path, warm=False)
    assert len(counted) == 1
    [cell] = run_sweep(("batch_norm",), (32,), (0,), Settings(epochs=2),
                       tmp_path, warm=False)
    assert len(counted) == 2 and cell["settings"]["epochs"] == 2
    assert len(list((tmp_path / "cells").iterdir())) == 2


def test_damaged_or_foreign_cell_files_are_recomputed(tmp_path, counted):
    task = ("group_norm", 32, 0, TINY)
    path = tmp_path / "cells" / f"{sweep.cell_key(*task)}.json"
    path.parent.mkdir()
    path.write_text('{"variant": "group_norm", "batch_si')   # torn write
    [cell] = run_sweep(*[(v,) for v in task[:3]], TINY, tmp_path, warm=False)
    assert len(counted) == 1 and json.loads(path.read_text()) == cell
    path.write_text(json.dumps({**cell, "seed": 5}))          # someone else's
    run_sweep(*[(v,) for v in task[:3]], TINY, tmp_path, warm=False)
    assert len(counted) == 2


def test_worker_processes_give_the_cells_of_a_single_process(tmp_path):
    """``jobs=2`` gives the cells that ``jobs=1`` gives in a fresh process:
    both load the kernels from the cache that the sweep fills first, so
    neither depends on which process compiled them."""
    code = ("import json\n"
            "from normkit.analysis import Settings, run_sweep\n"
            f"print(json.dumps(run_sweep({VARIANTS!r}, {SIZES[:1]!r}, "
            f"{SEEDS[:1]!r}, Settings(epochs={TINY.epochs}))))\n")
    single = subprocess.run([sys.executable, "-c", code], check=True,
                            capture_output=True, text=True)
    cells = run_sweep(VARIANTS, SIZES[:1], SEEDS[:1], TINY, tmp_path, jobs=2)
    assert cells == json.loads(single.stdout)
    assert len(list((tmp_path / "cells").iterdir())) == 2


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(TypeError):
        sweep.write_atomic(target, {"not json": object()})
    assert list(tmp_path.iterdir()) == []
    sweep.write_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
