"""``normkit compare``: a tiny end-to-end run and its option errors."""

import importlib.util
import json
import subprocess
import sys

import pytest

from normkit import cli

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = ["--variants", "batch_norm,layer_norm", "--batch-sizes", "4,16",
        "--seeds", "0", "--epochs", "1", "--jobs", "1"]


def test_tiny_compare_writes_results_and_prints_tables(tmp_path, capsys):
    out = tmp_path / "results"
    assert cli.main(["compare", "--out", str(out)] + TINY) == 0
    printed = capsys.readouterr()
    assert "batch_norm" in printed.out and "layer_norm" in printed.out
    assert "batch 4" in printed.out and "batch 16" in printed.out
    assert "population re-estimation" in printed.out
    assert "4/4 cells" in printed.err                 # the progress bar
    assert "done in " in printed.err and "elapsed " in printed.out
    assert "BatchNorm's m" in printed.out and "dense 1" in printed.out
    results = json.loads((out / "results.json").read_text())
    [one] = results["sweeps"]
    assert {c["variant"] for c in one["cells"]} == {"batch_norm", "layer_norm"}
    assert len(one["summary"]) == 4
    # the small net: m = N * 64 at the conv layer, N at the dense one
    assert one["extents"] == [
        {"layer": "conv 1", "features": "8 x 8 x 8", "batch 4": 256, "batch 16": 1024},
        {"layer": "dense 1", "features": "32", "batch 4": 4, "batch 16": 16}]
    for name in ("accuracy.png", "estimators.png", "mismatch.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["compare", "--out", str(out), "--no-plots"] + TINY) == 0
    assert "4 of 4 cells reused" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == results


@pytest.mark.parametrize("argv,message", [
    (["--variants", "batch_norm,bogus"], "unknown variant(s) 'bogus'"),
    (["--variants", ","], "unknown variant(s) (none given)"),
    (["--batch-sizes", "1,4"], "batch sizes must be >= 2, got [1]"),
    (["--batch-sizes", "4,x"], "must be comma-separated integers"),
    (["--batch-sizes", "4,4"], "repeat a value"),
    (["--seeds", "-1"], "seeds must be >= 0"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--epochs", "1.5"], "argument --epochs: expected a whole number >= 1, got '1.5'"),
    (["--steps", "many"], "argument --steps: expected a whole number"),
    (["--jobs", "0"], "argument --jobs: must be >= 1"),
    (["--last-stage", "5"], "argument --last-stage: invalid choice"),
    (["--preset", "huge"], "argument --preset: invalid choice"),
    (["--out", "/proc/forbidden"], "argument --out: cannot write to '/proc/forbidden'"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare"] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("normkit compare: error: argument ") or \
        "unrecognized" in last
    assert "Traceback" not in err and "positive_int" not in err


@pytest.mark.parametrize("argv", [
    ["compare", "--out", "/proc/forbidden"],
    ["compare", "--epochs", "1.5"],
])
def test_the_command_itself_prints_one_line_and_exits_2(argv):
    """As a user sees it: the ``normkit`` process, usage and one error line,
    no traceback."""
    done = subprocess.run([sys.executable, "-m", "normkit", *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "argument --" in errors[0]


def test_unreachable_scheduler_is_an_option_error(monkeypatch, tmp_path, capsys):
    pytest.importorskip("distributed")
    from normkit.analysis import cluster
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--out", str(tmp_path), "--scheduler",
                  "tcp://127.0.0.1:1"] + TINY)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --scheduler: cannot reach a Dask scheduler" in err
    assert "Traceback" not in err


def test_check_options_name_themselves(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--repeat", "0.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --repeat: expected a whole number >= 1, got '0.5'" in err
    assert "Traceback" not in err


def test_presets_and_their_overrides():
    from normkit.analysis.compare import MNIST_STEPS, PRESETS
    args = cli.build_parser().parse_args(["compare", "--preset", "mnist"])
    sweeps = cli._sweeps(args)
    assert sweeps == PRESETS["mnist"].sweeps and len(sweeps) == 2
    assert [s.steps for s in sweeps] == [0, MNIST_STEPS]
    assert {(s.dataset, s.network) for s in sweeps} == {("mnist", "conv")}
    args = cli.build_parser().parse_args(
        ["compare", "--preset", "mnist", "--steps", "50", "--last-stage", "2"])
    [one] = cli._sweeps(args)
    assert (one.steps, one.last_stage, one.dataset) == (50, 2, "mnist")
    [quick] = cli._sweeps(cli.build_parser().parse_args(["compare"]))
    assert (quick.dataset, quick.network, quick.epochs) == ("digits", "small", 20)


def test_out_must_be_a_folder(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--out", str(taken)] + TINY)
    assert exc.value.code == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_missing_extra_is_explained(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "sklearn" else real(name))
    assert cli.main(["compare", "--out", str(tmp_path)] + TINY) == 1
    assert "normkit[experiments]" in capsys.readouterr().err


def test_interrupt_says_how_to_resume(monkeypatch, tmp_path, capsys):
    import normkit.analysis

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(normkit.analysis, "run_compare", interrupted)
    assert cli.main(["compare", "--out", str(tmp_path)] + TINY) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
