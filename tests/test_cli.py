"""The command line (``python -m normkit``), ``benchmarks/compare.py``,
``benchmarks/overhead.py``, ``benchmarks/cold_calls.py``,
``benchmarks/pause.py``, ``benchmarks/passes.py``,
``benchmarks/spread.py``, ``benchmarks/plot_compare.py``'s tables,
``benchmarks/follows.py`` and ``benchmarks/engine_vs_torch.py``."""

from collections import Counter
import csv
import importlib.util
import json
from pathlib import Path
import platform
import subprocess
import sys

import numpy as np
import pytest

from normkit import _bench, cli

TINY_CHANNELS = (((3, 8, 5), 1), ((3, 5, 8), -1))
TINY_ROWS = (((6, 16), -1),)


@pytest.fixture
def tiny_cli(monkeypatch):
    """The check on tiny shapes (8 channels, 4 groups)."""
    monkeypatch.setattr(cli, "CHANNEL_SHAPES", TINY_CHANNELS)
    monkeypatch.setattr(cli, "ROW_SHAPES", TINY_ROWS)
    monkeypatch.setattr(cli, "GROUPS", 4)


def test_check_passes_and_lists_every_variant(tiny_cli, capsys):
    assert cli.main(["check", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    # said once if this process compiles anything, never when all is loaded
    assert out.count("compiling kernels") <= 1
    for variant in _bench.VARIANTS:
        assert variant in out
    assert "FAIL" not in out


def test_check_is_the_default_subcommand(tiny_cli, capsys):
    assert cli.main(["--variant", "layer_norm", "--dtype", "float16",
                     "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("layer_norm")]
    assert len(rows) == 1 and "float16" in rows[0]


def test_failure_exits_1(tiny_cli, monkeypatch, capsys):
    monkeypatch.setattr(cli, "max_error", lambda case, inputs: 1.0)
    assert cli.main(["--variant", "group_norm", "--dtype", "float64",
                     "--repeat", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--bogus"], ["check", "--dtype", "int8"],
                                  ["--variant", "rms_norm"], ["--repeat", "0"],
                                  ["frobnicate"]])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def _load_script(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"normkit_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", range(1, 9))
def test_balanced_order_has_every_ordered_pair_once(n):
    order = _bench.balanced_order(n)
    pairs = list(zip(order, order[1:] + order[:1]))  # read cyclically
    assert sorted(pairs) == [(a, b) for a in range(n) for b in range(n)]


@pytest.mark.parametrize("n, repeat, warmup", [(1, 3, 1), (3, 5, 2), (5, 15, 1)])
def test_median_times_each_callable_follows_each_equally_often(n, repeat, warmup):
    calls = []
    fns = {f"f{i}": (lambda i=i: calls.append(i)) for i in range(n)}
    assert set(_bench.median_times(fns, repeat, warmup)) == set(fns)
    warm, timed = calls[:n * warmup], calls[n * warmup:]
    assert sorted(warm) == sorted(list(range(n)) * warmup)
    cycles = -(-repeat // n)  # whole cycles: at least repeat runs of each
    assert sorted(timed) == sorted(list(range(n)) * n * cycles)
    # from the last warm-up on, every ordered pair is as frequent: the first
    # timed run follows what it follows at the start of every later cycle
    followed = [warm[-1]] + timed
    counts = Counter(zip(followed, followed[1:]))
    assert counts == {(a, b): cycles for a in range(n) for b in range(n)}


@pytest.mark.parametrize("case", [_bench.Case("batch_norm", (2, 5, 4), -1),
                                  _bench.Case("batch_renorm", (2, 4, 5), 1)],
                         ids=lambda case: case.variant)
def test_compare_script_runs_one_tiny_case(case):
    compare = _load_script("compare")
    times = compare.measure(case, repeat=1, quick=True)
    assert set(times) == set(compare.TIMED)
    for name in ("copy", "fwd", "fwd+bwd", "ref fwd"):
        assert times[name] > 0
    if _bench.torch is not None and case.variant in _bench.TORCH_VARIANTS:
        assert times["torch fwd+bwd"] > 0
    row = compare.table_row(case, times)
    assert len(row) == len(compare.HEADERS) and row[0] == case.variant


@pytest.mark.parametrize("case", [
    _bench.Case("group_norm", (2, 4, 3, 3), 1, groups=2),
    _bench.Case("layer_norm", (3, 8), -1, "bfloat16")],
    ids=lambda case: f"{case.variant}-{case.dtype}")
def test_compare_script_times_the_torch_adapter(case, monkeypatch):
    """``--torch-adapter``: torch's module, normkit.torch eager and compiled
    (here torch.compile left out: its compilation is not what is tested)
    and normkit on NumPy, in the case's dtype."""
    torch = pytest.importorskip("torch")
    if case.dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    compare = _load_script("compare")
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    medians, compile_s = compare.measure_adapter(case, 1)
    assert set(medians) == {f"{name} {step}" for name in compare.ADAPTER_TIMED
                            for step in ("fwd", "fwd+bwd")}
    assert all(seconds > 0 for seconds in medians.values()) and compile_s > 0
    rows = compare.adapter_rows(case, medians, compile_s)
    assert [len(row) for row in rows] == [len(compare.ADAPTER_HEADERS)] * 2
    assert rows[0][3] == case.dtype


def test_compare_script_only_times_the_variants_asked_for(tmp_path,
                                                          monkeypatch, capsys):
    compare = _load_script("compare")
    monkeypatch.setattr(compare, "CASES", [
        _bench.Case("batch_norm", (2, 4, 3), 1),
        _bench.Case("batch_renorm", (2, 4, 3), 1),
        _bench.Case("batch_renorm", (2, 3, 4), -1)])
    path = tmp_path / "only.json"
    compare.main(["--only", "batch_renorm", "--repeat", "1", "--quick",
                  "--json", str(path)])
    results = json.loads(path.read_text())["results"]
    assert [(r["variant"], r["layout"]) for r in results] == [
        ("batch_renorm", "first"), ("batch_renorm", "last")]
    with pytest.raises(SystemExit) as stop:
        compare.main(["--only", "batch_norms"])
    assert stop.value.code == 2
    assert "invalid choice: 'batch_norms'" in capsys.readouterr().err


def test_compare_script_times_the_layer_cells_with_layers(tmp_path,
                                                          monkeypatch):
    compare = _load_script("compare")
    monkeypatch.setattr(compare, "CASES", [_bench.Case("batch_renorm",
                                                       (2, 4, 3), 1)])
    monkeypatch.setattr(compare, "LAYER_CASES", [
        _bench.Case("batch_norm", (6, 5), 1),
        _bench.Case("layer_norm", (3, 8), -1)])
    path = tmp_path / "layers.json"
    compare.main(["--layers", "--only", "layer_norm", "batch_norm",
                  "--repeat", "1", "--quick", "--json", str(path)])
    results = json.loads(path.read_text())["results"]
    assert [(r["variant"], r["shape"]) for r in results] == [
        ("batch_norm", [6, 5]), ("layer_norm", [3, 8])]


def test_compare_script_keeps_freed_memory_when_asked(tmp_path, monkeypatch,
                                                      capsys):
    compare = _load_script("compare")
    monkeypatch.setattr(compare, "CASES", [_bench.Case("batch_renorm",
                                                       (2, 4, 3), 1)])
    calls = []
    # the real setting would change this test process's allocator for good:
    # tests/test_cli.py::test_keep_freed_memory_reuses_freed_blocks runs it
    # in a child process
    monkeypatch.setattr(_bench, "keep_freed_memory",
                        lambda: calls.append(True) or True)
    for argv, kept in (([], False), (["--keep-memory"], True)):
        path = tmp_path / "kept.json"
        compare.main(argv + ["--repeat", "1", "--quick", "--json", str(path)])
        assert json.loads(path.read_text())["freed_memory_kept"] is kept
        assert len(calls) == kept
        assert ("freed memory kept" if kept else "freed memory left to glibc"
                ) in capsys.readouterr().out


_FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys
import numpy as np
from normkit import _bench
kept = sys.argv[1] == "kept" and _bench.keep_freed_memory()
def written():
    block = np.empty(40 << 20, np.uint8)  # above glibc's 32 MiB at most
    block[::4096] = 1
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    written()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, faults[1], faults[2])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reuses_freed_blocks():
    """A block of 40 MiB is mapped afresh on every allocation by default
    (above the largest threshold glibc sets itself), and reused, its
    pages already written, once freed memory is kept."""
    seen = {}
    for mode in ("default", "kept"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BLOCK,
                              mode], check=True, capture_output=True,
                             text=True).stdout.split()
        seen[mode] = (out[0] == "True", int(out[1]), int(out[2]))
    assert seen["default"][0] is False and min(seen["default"][1:]) > 0
    assert seen["kept"] == (True, 0, 0)


def test_heap_script_times_each_pass_in_each_setting():
    heap = _load_script("heap")
    case = _bench.Case("batch_norm", (2, 4, 3), 1)
    impl = _bench.implementations(case, _bench.make_inputs(case))
    passes = [name for name in heap.PASSES if name in impl]
    assert passes[0] == "fwd+bwd"
    measured = heap.measure(case, 2, "fwd+bwd")
    assert measured["ms"] > 0 and measured["faults"] >= 0
    args = heap.argparse.Namespace(processes=1, repeat=1, variant=case.variant,
                                   shape=list(case.shape), axis=case.axis,
                                   dtype=case.dtype)
    results = heap.run_children(args, passes)
    assert [(r["mode"], r["pass"]) for r in results] == [
        (mode, name) for mode in heap.MODES for name in passes]
    glibc = platform.libc_ver()[0] == "glibc"
    assert [r["kept"] for r in results] == [
        mode == "kept" and glibc for mode in heap.MODES for _ in passes]
    assert all(r["ms"] > 0 and r["faults"] >= 0 for r in results)


def test_follows_script_times_each_forward_after_each_pass():
    pytest.importorskip("torch")
    follows = _load_script("follows")
    medians = follows.follows(_bench.Case("group_norm", (2, 3, 4), -1,
                                          groups=2), 2)
    assert set(medians) == {(target, before) for target in follows.TARGETS
                            for before in follows.PREDECESSORS}
    assert all(seconds > 0 for seconds in medians.values())


def test_spread_script_ranges_and_verdicts():
    compare = _load_script("compare")
    spread = _load_script("spread")
    small = _bench.Case("batch_norm", (2, 4, 3), 1)
    large = _bench.Case("layer_norm", (1024, 1024), -1)  # 4 MiB of float32
    only_once = _bench.Case("rms_norm", (4, 8), -1)
    runs = []
    for fwd, fwd_bwd, torch_fwd in ((1.1, 2.0, 1.2), (1.5, 3.5, 1.4)):
        t = {"copy": 1.0, "fwd": fwd, "fwd+bwd": fwd_bwd, "ref fwd": None,
             "torch fwd": torch_fwd, "torch fwd+bwd": 4.0}
        cases = (small, large) + ((only_once,) if not runs else ())
        runs.append({"results": [compare.json_record(c, t) for c in cases]})
    rows = spread.spread(runs)
    assert list(rows) == ["batch_norm 2x4x3 first float32",
                          "layer_norm 1024x1024 rows float32"]
    small_row, large_row = rows.values()
    assert (small_row["size"], large_row["size"]) == ("small", "large")
    np.testing.assert_allclose(large_row["fwd/copy"], [1.1, 1.5])
    np.testing.assert_allclose(large_row["fwd vs torch"], [1.2 / 1.1, 1.4 / 1.5])
    assert (large_row["fwd goal"], large_row["fwd+bwd goal"]) == ("some", "some")
    assert (small_row["fwd goal"], small_row["fwd+bwd goal"]) == ("all", "all")
    table = [spread.table_row(key, row) for key, row in rows.items()]
    assert table[0][4] == "FB" and table[1][4] == "fb"
    assert table[1][5] == "either 0.93-1.09" and table[1][6] == "faster 1.14-2.00"


def test_spread_script_writes_its_table_as_csv(tmp_path, capsys):
    compare = _load_script("compare")
    spread = _load_script("spread")
    cases = (_bench.Case("batch_norm", (2, 4, 3), 1),
             _bench.Case("layer_norm", (4, 8), -1, "bfloat16"))
    paths = []
    for n, fwd in enumerate((1.5, 2.5)):
        t = {"copy": 1.0, "fwd": fwd, "fwd+bwd": 3.0, "ref fwd": None,
             "torch fwd": 2.0, "torch fwd+bwd": None}
        paths.append(tmp_path / f"run{n}.json")
        paths[-1].write_text(json.dumps(
            {"results": [compare.json_record(c, t) for c in cases]}))
    out = tmp_path / "spread.csv"
    spread.main(["--csv", str(out)] + [str(p) for p in paths])
    with open(out, newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == spread.HEADERS
    assert written[1:] == [
        ["batch_norm 2x4x3 first float32", "small", "1.50-2.50", "3.00-3.00",
         "fB", "either 0.80-1.33", "–", "1000.00-1000.00"],
        ["layer_norm 4x8 rows bfloat16", "small", "1.50-2.50", "3.00-3.00",
         "fB", "either 0.80-1.33", "–", "1000.00-1000.00"]]
    assert "2 runs" in capsys.readouterr().out


def _adapter_run(scale, cases):
    """A ``compare.py --adapter-only --json`` record of ``cases``, each
    pass timed ``scale`` times as long by torch as by normkit.torch, which
    takes 1.25 times normkit's NumPy time (1.5 compiled)."""
    cells = []
    for case in cases:
        seconds = {}
        for step, numpy_s in (("fwd", 0.002), ("fwd+bwd", 0.006)):
            seconds.update({f"numpy {step}": numpy_s,
                            f"normkit.torch {step}": 1.25 * numpy_s,
                            f"normkit.torch compiled {step}": 1.5 * numpy_s,
                            f"torch {step}": scale * 1.25 * numpy_s})
        cells.append({"variant": case.variant, "shape": list(case.shape),
                      "layout": case.layout, "dtype": case.dtype,
                      "seconds": seconds, "compile_seconds": 1.0})
    return {"results": [], "torch_adapter": cells}


def test_spread_script_adapter_ranges():
    spread = _load_script("spread")
    kept = _bench.Case("group_norm", (2, 4, 3), 1)
    once = _bench.Case("layer_norm", (4, 8), -1, "bfloat16")
    runs = [_adapter_run(0.8, (kept, once)), _adapter_run(2.0, (kept,))]
    rows = spread.adapter_spread(runs)
    assert list(rows) == ["group_norm 2x4x3 first float32 fwd",
                          "group_norm 2x4x3 first float32 fwd+bwd"]
    row = rows["group_norm 2x4x3 first float32 fwd"]
    np.testing.assert_allclose(row["eager/numpy"], [1.25, 1.25])
    np.testing.assert_allclose(row["compiled/numpy"], [1.5, 1.5])
    np.testing.assert_allclose(row["torch/eager"], [0.8, 2.0])
    assert spread.adapter_row("cell", row) == ["cell", "1.25-1.25",
                                               "1.50-1.50", "either 0.80-2.00"]
    assert spread.spread(runs) == {}  # no cells of the main table


def test_plot_compare_writes_the_adapter_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot_compare = _load_script("plot_compare")
    case = _bench.Case("batch_norm", (2, 4, 3), 1)
    src = tmp_path / "adapter.json"
    src.write_text(json.dumps(_adapter_run(2.0, (case,))))
    plot_compare.main([str(src)])
    # a run of the adapter's cells alone: their table only, named as the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.csv",
                                                          "adapter.json"]
    lines = (tmp_path / "adapter.csv").read_text().splitlines()
    assert lines[0].split(",") == plot_compare.ADAPTER_HEADER
    assert lines[1:] == [
        'batch_norm,"(2, 4, 3)",first,float32,fwd,5.00,2.50,3.00,2.00,'
        '1.25x,2.00x',
        'batch_norm,"(2, 4, 3)",first,float32,fwd+bwd,15.00,7.50,9.00,6.00,'
        '1.25x,2.00x']
    assert "adapter.csv" in capsys.readouterr().out
    # with the main table's cells: the chart, its tables and the adapter's
    t = {"copy": 1.0, "fwd": 1.1, "fwd+bwd": 2.0, "ref fwd": None,
         "torch fwd": 1.2, "torch fwd+bwd": 4.0}
    both = _adapter_run(2.0, (case,))
    both["results"] = [_load_script("compare").json_record(case, t)]
    src.write_text(json.dumps(both))
    plot_compare.main([str(src), str(tmp_path / "out.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.csv", "adapter.json", "out-adapter.csv", "out-normkit.csv",
        "out-torch.csv", "out.png"]
    assert ((tmp_path / "out-adapter.csv").read_text()
            == (tmp_path / "adapter.csv").read_text())


@pytest.mark.parametrize("case", [
    _bench.Case("batch_norm", (3, 5, 4), -1),
    _bench.Case("group_norm", (2, 4, 3), 1, "float16", groups=2),
    _bench.Case("layer_norm", (3, 8), -1),
    _bench.Case("layer_norm", (2, 3, 4, 5), -1, normalized_ndim=3)],
    ids=lambda case: f"{case.variant}-{case.layout}-{case.dtype}")
def test_overhead_script_times_the_same_normalization_both_ways(case):
    """The engine-only callables compute exactly the API's forward and
    backward, so the difference of their times is the Python around the
    kernels."""
    overhead = _load_script("overhead")
    timed = overhead.callables(case)
    y, _, _, _ = timed["engine"]()
    np.testing.assert_array_equal(y, timed["api"]())
    assert y.shape == case.shape and y.dtype.name == case.dtype
    dx, sum_dy, sum_dy_xhat = timed["engine bwd"]()
    api_dx, dweight, dbias = timed["api bwd"]()
    np.testing.assert_array_equal(dx, api_dx)
    assert dx.shape == case.shape and dx.dtype.name == case.dtype
    for total, gradient in ((sum_dy_xhat, dweight), (sum_dy, dbias)):
        np.testing.assert_array_equal(
            np.asarray(total).astype(gradient.dtype).reshape(gradient.shape),
            gradient)


def test_overhead_script_times_forwards_and_backwards_apart(monkeypatch):
    """The forwards and the backwards are timed in rotations of their own,
    each with the copy, and every column comes from the first rotation
    that times it."""
    overhead = _load_script("overhead")
    rotations = []

    def median_times(fns, repeat):
        rotations.append(tuple(fns))
        return {name: len(rotations) * 1e-6 for name in fns}

    monkeypatch.setattr(overhead._bench, "median_times", median_times)
    timed = overhead.medians(_bench.Case("group_norm", (2, 4, 3), 1,
                                         groups=2), 3)
    assert rotations == [("api", "engine", "copy"),
                         ("api bwd", "engine bwd", "copy")]
    assert timed == pytest.approx({"api": 1, "engine": 1, "copy": 1,
                                   "api bwd": 2, "engine bwd": 2})


def test_overhead_script_times_the_tiny_forward_after_the_cell(monkeypatch):
    """after_cell runs the cell's forward and backward before each timed
    tiny forward and each timed tiny backward, and times only those."""
    overhead = _load_script("overhead")
    case = _bench.Case("group_norm", (2, 4, 3), 1, groups=2)
    calls = []
    monkeypatch.setattr(overhead._bench, "normkit_forward_backward",
                        lambda variant, inputs: calls.append(inputs.x.shape))
    forward = overhead._bench.normkit_forward
    monkeypatch.setattr(overhead._bench, "normkit_forward",
                        lambda variant, inputs: calls.append(
                            forward(variant, inputs).shape))
    after = overhead.after_cell(case, 3)
    assert set(after) == {"fwd", "bwd"}
    assert after["fwd"] > 0 and after["bwd"] > 0
    # each round: the cell, the tiny forward, the cell, the tiny backward
    assert calls == [(2, 4, 3), (2, 4, 1), (2, 4, 3)] * 3


def test_cold_calls_script_times_every_step_after_the_pass(monkeypatch):
    """Each step runs once per pass, right after it, and the warm timing
    calls every step; every step works on the tiny input."""
    cold_calls = _load_script("cold_calls")
    timed = cold_calls.steps()
    for step in timed.values():
        step()
    order = []
    monkeypatch.setattr(cold_calls, "the_pass",
                        lambda after: lambda: order.append(after))
    wrapped = {name: (lambda name=name: order.append(name))
               for name in ("a", "b")}
    times = cold_calls.after_pass(wrapped, 2)
    assert order == ["normkit", "a", "normkit", "b"] * 2
    assert set(times) == {"a", "b"}
    assert set(cold_calls.warm(timed, number=1)) == set(timed)


def test_pause_script_times_each_forward_right_after_each_pause(capsys):
    pause = _load_script("pause")
    assert [label for label, _ in pause.pauses([0, 0.5])] == [
        "none", "sleep 0.5 ms", "busy 0.5 ms"]
    medians = pause.measure(pause.CASES[1], [0, 0.01], 1)
    assert list(medians) == ["none", "sleep 0.01 ms", "busy 0.01 ms"]
    forwards = {"fwd"} | ({"torch fwd"} if _bench.torch is not None else set())
    assert all(set(m) == forwards for m in medians.values())
    pause.main(["--repeat", "1", "--pauses", "0"])
    rows = capsys.readouterr().out.splitlines()[3:]
    assert [row.split()[0] for row in rows] == [c.variant for c in pause.CASES]
    with pytest.raises(SystemExit):
        pause.main(["--pauses", "-1"])


def test_cold_calls_script_passes_are_forwards_and_backwards():
    pytest.importorskip("torch")
    cold_calls = _load_script("cold_calls")
    for after in ("normkit", "torch"):
        cold_calls.the_pass(after)()


def test_engine_vs_torch_script_times_the_api_and_the_engine_beside_torch(
        monkeypatch, capsys):
    """The engine's passes compute the API's forward and ``dx``, every
    pass is timed in one interleave, and each ratio is torch's time over
    the column's."""
    pytest.importorskip("torch")
    script = _load_script("engine_vs_torch")
    case = _bench.Case("batch_norm", (2, 4, 3), -1)
    timed = script.callables(case)
    assert tuple(timed) == script.PASSES
    y, _, _, _ = timed["engine fwd"]()
    np.testing.assert_array_equal(y, timed["fwd"]())
    dx, _, _ = timed["engine fwd+bwd"]()
    np.testing.assert_array_equal(dx, timed["fwd+bwd"]()[1])
    rotations = []

    def median_times(fns, repeat):
        rotations.append(tuple(fns))
        return {name: (i + 1) * 1e-3 for i, name in enumerate(fns)}

    monkeypatch.setattr(script._bench, "median_times", median_times)
    ms = script.measure(case, 1)
    assert rotations == [script.PASSES]
    assert script.row(case, ms) == [case.label, "2.00", "6.00", "4.00", "2.00",
                                    "0.67", "3.00", "7.00", "5.00", "1.67",
                                    "0.71", "1.00"]
    monkeypatch.setattr(script, "CASES", (case,))
    script.main(["--repeat", "1"])
    assert case.label in capsys.readouterr().out


def test_overhead_script_tiny_shapes():
    overhead = _load_script("overhead")
    shapes = {(case.variant, case.layout): _bench.tiny(case).shape
              for case in overhead.CASES}
    assert shapes[("batch_norm", "first")] == (2, 64, 1, 1)
    assert shapes[("group_norm", "last")] == (2, 1, 1, 64)
    assert shapes[("layer_norm", "rows")] == (2, 1024)


@pytest.mark.parametrize("case", [
    _bench.Case("batch_norm", (3, 5, 70000), 1),
    _bench.Case("group_norm", (2, 4, 3), 1, "float16", groups=2),
    _bench.Case("batch_norm", (3, 5, 4), -1, "bfloat16"),
    _bench.Case("rms_norm", (3, 8), -1),
    _bench.Case("layer_norm", (2, 3, 4, 5), -1, normalized_ndim=3)],
    ids=lambda case: f"{case.variant}-{case.layout}-{case.dtype}")
def test_passes_script_times_the_passes_it_names(case):
    """The forward equals the moments then the map it is set against, and
    the read, write and copy passes touch every value (several chunks in
    the first case)."""
    if case.dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    passes = _load_script("passes")
    timed = passes.callables(case)
    assert tuple(timed) == passes.TIMED
    y, mean, var, rstd = timed["forward"]()
    y = y.copy()
    moments = timed["moments"]()
    # the same statistics to the compute precision's rounding (float32 for
    # every dtype here): the kernels center their sums differently (short
    # segments about their own mean, a row about the mean of its head)
    spread = np.sqrt(np.max(var))
    np.testing.assert_allclose(moments[0], mean, rtol=0, atol=1e-6 * spread)
    np.testing.assert_allclose(moments[1], var, rtol=1e-6)
    mapped = timed["normalize"]()
    half = case.dtype != "float32"
    np.testing.assert_allclose(mapped.astype(np.float64), y.astype(np.float64),
                               rtol=1e-2 if half else 1e-5,
                               atol=1e-2 if half else 1e-5)
    x = _bench.make_inputs(case).x
    stored = passes.storage_view(x)
    assert timed["read"]() == pytest.approx(stored.astype(np.float64).sum(),
                                            rel=1e-5)
    timed["write"]()
    assert np.all(passes.storage_view(mapped) == 1)
    timed["copy"]()
    np.testing.assert_array_equal(passes.storage_view(mapped), stored)


@pytest.mark.parametrize("case, slice_shape, tiny", [
    (_bench.Case("layer_norm", (16, 64), -1, "float16"), (4, 64), (2, 64)),
    (_bench.Case("batch_norm", (4, 6, 5, 5), 1), (1, 3, 5, 5), (2, 6, 1, 1)),
    (_bench.Case("batch_norm", (4, 5, 5, 6), -1), (1, 5, 5, 3), (2, 1, 1, 6))],
    ids=lambda v: str(v))
def test_passes_script_per_value_times_each_pass_on_each_input(
        case, slice_shape, tiny, monkeypatch, capsys):
    """``--per-value``: three finite costs per pass, over the slice, the
    cell and the cell on every thread, with Numba's thread count restored;
    the fixed cost is that of two rows or samples of one value per
    channel."""
    import numba
    passes = _load_script("passes")
    assert _bench.tiny(case).shape == tiny
    threads = numba.get_num_threads()
    costs = passes.per_value(case, slice_shape, 2)
    assert numba.get_num_threads() == threads
    assert tuple(costs) == passes.PER_VALUE_PASSES
    assert all(len(v) == 3 and np.all(np.isfinite(v)) for v in costs.values())
    monkeypatch.setattr(passes, "PER_VALUE_CELLS", ((case, slice_shape),))
    passes.main(["--per-value", "--repeat", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(case.label)]
    assert [row.split()[-4] for row in rows] == list(passes.PER_VALUE_PASSES)


def test_passes_script_segments_times_the_map_for_each_rows_and_length(
        monkeypatch, capsys):
    """``--segments``: a finite cost per value for every ``(A, L)``, on one
    thread with Numba's thread count restored, printed as one row per
    ``A`` and one column per ``L``; ``--segments`` and ``--per-value``
    exclude each other."""
    import numba
    passes = _load_script("passes")
    threads = numba.get_num_threads()
    costs = passes.segment_costs((2, 3), (4, 9), 1, values=600)
    assert numba.get_num_threads() == threads
    assert set(costs) == {(2, 4), (2, 9), (3, 4), (3, 9)}
    assert all(np.isfinite(v) and v > 0 for v in costs.values())
    monkeypatch.setattr(passes, "SEGMENT_ROWS", (2, 3))
    monkeypatch.setattr(passes, "SEGMENT_LENGTHS", (4, 9))
    monkeypatch.setattr(passes, "SEGMENT_VALUES", 600)
    passes.main(["--segments", "--repeat", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-2:] == ["4", "9"]
    assert [line.split()[0] for line in lines[3:]] == ["2", "3"]
    with pytest.raises(SystemExit):
        passes.main(["--segments", "--per-value"])


@pytest.mark.parametrize("variant", _bench.TORCH_VARIANTS)
def test_torch_callables_match_normkit_channels_last(variant):
    pytest.importorskip("torch")
    shape = (6, 16) if variant == "layer_norm" else (2, 3, 4, 8)
    case = _bench.Case(variant, shape, -1, "float64", groups=4)
    inputs = _bench.make_inputs(case)
    forward, forward_backward = _bench.torch_callables(case, inputs)
    y = forward().detach()
    if case.layout == "last":
        y = y.movedim(1, -1)
    np.testing.assert_allclose(y.numpy(),
                               _bench.reference_forward(variant, inputs),
                               atol=1e-10)
    forward_backward()
