"""``normkit compare``: a tiny end-to-end run and its option errors."""

import importlib.util
import json

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
    results = json.loads((out / "results.json").read_text())
    assert {c["variant"] for c in results["cells"]} == {"batch_norm", "layer_norm"}
    assert len(results["summary"]) == 4
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
    (["--epochs", "0"], "must be >= 1"),
    (["--jobs", "0"], "must be >= 1"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare"] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--out", str(taken)] + TINY)
    assert exc.value.code == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_missing_extra_is_explained(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "sklearn" else real(name))
    assert cli.main(["compare"] + TINY) == 1
    assert "normkit[experiments]" in capsys.readouterr().err


def test_interrupt_says_how_to_resume(monkeypatch, tmp_path, capsys):
    import normkit.analysis

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(normkit.analysis, "run_compare", interrupted)
    assert cli.main(["compare", "--out", str(tmp_path)] + TINY) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
