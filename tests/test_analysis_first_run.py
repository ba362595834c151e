"""The README's first command from a clone's root: a non-editable install,
a cold kernel cache, and the first run identical to the second, sweep and
studies.

Before the fix, the kernel warm-up ran ``python -c ...``, which puts the
working directory first on the import path: from the repository root it
imported (and cached) ``./normkit`` while the workers imported the
installed package and compiled their own kernels, so the first run's cells
differed from every later run's.
"""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
# two cells, one per worker process, on the fewest kernels that show it
ARGS = ["compare", "--variants", "batch_norm", "--batch-sizes", "4",
        "--seeds", "0,1", "--epochs", "1", "--jobs", "2", "--no-plots"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """normkit installed (not editable) into a fresh folder, from a copy of
    the package sources, and a launcher like pip's console script."""
    if not (ROOT / "normkit").is_dir() or not (ROOT / "pyproject.toml").exists():
        pytest.skip("needs the repository's source tree")
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "normkit", source / "normkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = base / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(site),
         str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"pip could not install a copy: {done.stderr[-300:]}")
    launcher = base / "bin" / "normkit"
    launcher.parent.mkdir()
    launcher.write_text("import sys\nfrom normkit.cli import main\n"
                        "if __name__ == '__main__':\n    sys.exit(main())\n")
    return site, launcher


def _run(installed, out):
    site, launcher = installed
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, str(launcher), *ARGS, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), done.stderr


def test_first_run_from_the_repository_root_equals_the_second(installed,
                                                              tmp_path):
    site, _ = installed
    assert not list(site.glob("normkit/**/*.nbi"))        # a cold cache
    first, first_err = _run(installed, tmp_path / "first")
    assert list(site.glob("normkit/**/*.nbi"))            # filled ...
    # ... for the installed copy, not for ./normkit of the source tree
    assert "compiling the study's kernels" in first_err
    second, second_err = _run(installed, tmp_path / "second")
    assert "compiling" not in second_err                  # only when it does
    assert first["sweeps"][0]["cells"] == second["sweeps"][0]["cells"]
    # the studies after the sweep load their kernels from the cache too
    # (before, the first run's process compiled them itself: last bits)
    for study in ("estimators", "mismatch", "batch_dependence"):
        assert first[study] == second[study], study
