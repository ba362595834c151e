"""The sweep on a Dask cluster: a LocalCluster on 127.0.0.1 gives the cells
of a local run, cell by cell, and its cell files resume like a local run's."""

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("distributed")

from normkit.analysis import Settings, run_sweep  # noqa: E402

VARIANTS = ("batch_norm", "group_norm")
SIZES = (4, 16)
SEEDS = (0,)
TINY = Settings(epochs=1)


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of two single-threaded worker processes on
    127.0.0.1, shared by the module's tests but the interrupted one (which
    starts its own through ``scheduler="local"``, twice); closed at the end
    of the module."""
    from dask.distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as connected:
        yield connected


def _files(folder):
    return {p.name: json.loads(p.read_text())
            for p in sorted((folder / "cells").iterdir())}


def test_local_cluster_gives_the_cells_of_a_local_run(tmp_path, client):
    local = run_sweep(VARIANTS, SIZES, SEEDS, TINY, tmp_path / "local", jobs=2)
    seen = []
    on_dask = run_sweep(VARIANTS, SIZES, SEEDS, TINY, tmp_path / "dask", jobs=2,
                        scheduler=client,
                        on_cell=lambda cell, reused: seen.append(reused))
    assert on_dask == local                      # cell by cell, bit for bit
    assert seen == [False] * 4
    assert _files(tmp_path / "dask") == _files(tmp_path / "local")

    # a second run on a cluster reuses every cell file; none is recomputed
    seen.clear()
    again = run_sweep(VARIANTS, SIZES, SEEDS, TINY, tmp_path / "dask", jobs=1,
                      scheduler=client,
                      on_cell=lambda cell, reused: seen.append(reused))
    assert again == local and seen == [True] * 4


def test_interrupted_cluster_sweep_keeps_its_finished_cells(tmp_path):
    """With a cluster of its own each time (``scheduler="local"``), as a
    command-line run would have."""
    finished = []

    def stop_after_one(cell, reused):
        finished.append(cell)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(VARIANTS, SIZES[:1], SEEDS, TINY, tmp_path, jobs=2,
                  scheduler="local", on_cell=stop_after_one)
    files = list((tmp_path / "cells").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text()) == finished[0]
    seen = []
    run_sweep(VARIANTS, SIZES[:1], SEEDS, TINY, tmp_path, jobs=2,
              scheduler="local", on_cell=lambda cell, reused: seen.append(reused))
    assert sorted(seen) == [False, True]


def test_a_study_on_a_local_cluster_gives_the_cells_of_local_workers(tmp_path,
                                                                   client):
    """A study of several sweeps (the landscape study and its noisy control)
    runs on one cluster and gives the cells of local worker processes."""
    from normkit.analysis import run_study
    pytest.importorskip("mlxtend")
    options = dict(variants=["batch_norm"], seeds=[0, 1], steps=4, jobs=2,
                   plots=False, progress=False)
    with open(tmp_path / "table.txt", "w") as stream:
        local = run_study("landscape", tmp_path / "local", stream=stream, **options)
        on_dask = run_study("landscape", tmp_path / "dask", scheduler=client,
                            stream=stream, **options)
    assert [one["label"] for one in on_dask["sweeps"]] == [
        "relu", "relu, batch_norm + noise"]
    assert on_dask["sweeps"] == local["sweeps"]
    assert on_dask["summary"] == local["summary"]
    assert _files(tmp_path / "dask") == _files(tmp_path / "local")
