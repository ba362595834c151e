"""Plug-ins through the ``normkit.normalizers`` entry-point group: the
example package installed with pip, and hand-made distributions for the
failure cases (broken import, not callable, name clashes)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import normkit
from normkit import registry
from normkit.testing import check_conformance

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "position_norm"


@pytest.fixture
def plugin_path(monkeypatch):
    """Put directories on ``sys.path`` for a test; afterwards take them off,
    drop the modules imported from them and reload the plug-ins."""
    added = []

    def add(directory):
        monkeypatch.syspath_prepend(str(directory))
        added.append(str(directory))
        return directory

    yield add
    monkeypatch.undo()
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if any(origin.startswith(directory) for directory in added):
            del sys.modules[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", normkit.PluginWarning)
        normkit.refresh()


def _distribution(root, name, entry_points, module_source=None):
    """A minimal installed distribution ``name`` under ``root``: metadata,
    ``normkit.normalizers`` entry points and, optionally, a module."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                   f"Version: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[normkit.normalizers]\n{lines}")
    if module_source is not None:
        (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    return root


GOOD_MODULE = """
    import normkit

    class Rows(normkit.Normalizer):
        centered = False          # RMS normalization of each row

        def view(self, shape):
            return normkit.engine.trailing_view(shape, 1)
"""


def _refresh_with_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = normkit.refresh()
    return loaded, [str(w.message) for w in caught
                    if issubclass(w.category, normkit.PluginWarning)]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="pip needs setuptools to build the example without "
                           "build isolation (no network)")
def test_example_package_installs_registers_and_conforms(tmp_path, plugin_path):
    source = shutil.copytree(EXAMPLE, tmp_path / "src")   # builds write here
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target),
                    str(source)], check=True, capture_output=True)
    assert "position_norm" not in normkit.available()
    plugin_path(target)
    loaded, messages = _refresh_with_warnings()
    assert loaded == ["position_norm"] and messages == []
    assert "position_norm" in normkit.available()
    layer = normkit.create("position_norm", eps=1e-3)
    from normkit_position_norm import PositionNorm, reference
    assert type(layer) is PositionNorm
    x = np.random.default_rng(0).standard_normal((2, 6, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(x), reference(x, 1e-3), rtol=1e-5, atol=1e-5)
    check_conformance(lambda: normkit.create("position_norm"), x.astype(np.float64),
                      lambda x, state, training: reference(x))


def test_import_never_loads_plugins_and_a_broken_one_only_warns(tmp_path):
    _distribution(tmp_path, "broken_plugin",
                  {"broken": "module_that_does_not_exist:Norm"})
    script = textwrap.dedent("""
        import json, warnings
        warnings.simplefilter("error")          # any warning on import fails
        import normkit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = normkit.available()
        print(json.dumps([names, [str(w.message) for w in caught]]))
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True,
                         capture_output=True, text=True,
                         env={**_clean_env(), "PYTHONPATH": str(tmp_path)}).stdout
    names, messages = json.loads(out)
    assert "broken" not in names and "batch_norm" in names
    assert len(messages) == 1
    assert "'broken'" in messages[0] and "module_that_does_not_exist" in messages[0]
    assert "failed to load" in messages[0]


def _clean_env():
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_failing_and_non_callable_plugins_are_skipped_others_load(tmp_path, plugin_path):
    _distribution(tmp_path, "good_plugin", {"rows_rms": "good_plugin:Rows"},
                  GOOD_MODULE)
    _distribution(tmp_path, "raising_plugin", {"raising": "raising_plugin:Norm"},
                  "raise RuntimeError('plug-in import failed on purpose')\n")
    _distribution(tmp_path, "constant_plugin", {"constant": "constant_plugin:VALUE"},
                  "VALUE = 3\n")
    plugin_path(tmp_path)
    loaded, messages = _refresh_with_warnings()
    assert loaded == ["rows_rms"]
    assert sorted(messages) == sorted([
        "normkit plug-in 'constant' (constant_plugin:VALUE) skipped: it is a "
        "int, not a class or factory",
        "normkit plug-in 'raising' (raising_plugin:Norm) skipped: it failed to "
        "load: RuntimeError: plug-in import failed on purpose"])
    x = np.random.default_rng(1).standard_normal((3, 5))
    y = normkit.create("rows_rms")(x)
    np.testing.assert_allclose(y, normkit.rms_norm(x, 5, eps=1e-5), rtol=1e-12)


def test_name_clashes_are_errors_that_name_both(tmp_path, plugin_path):
    _distribution(tmp_path, "clash_builtin", {"batch_norm": "clash_builtin:Rows"},
                  GOOD_MODULE)
    _distribution(tmp_path, "twin_a", {"twin": "twin_a:Rows"}, GOOD_MODULE)
    _distribution(tmp_path, "twin_b", {"twin": "twin_b:Rows"}, GOOD_MODULE)
    plugin_path(tmp_path)
    loaded, messages = _refresh_with_warnings()
    assert loaded == []
    assert sorted(messages) == sorted([
        "normkit plug-in 'batch_norm' (clash_builtin:Rows) skipped: its name is "
        "taken by the built-in BatchNorm",
        "normkit plug-in 'twin' (twin_a:Rows) and normkit plug-in 'twin' "
        "(twin_b:Rows) skipped: they have the same name"])
    assert normkit.create("batch_norm", num_features=2).__class__ is normkit.BatchNorm
    assert "twin" not in normkit.available()


def test_register_cannot_take_a_plugin_name_and_refresh_forgets_removed(
        tmp_path, plugin_path, monkeypatch):
    _distribution(tmp_path, "good_plugin", {"rows_rms": "good_plugin:Rows"},
                  GOOD_MODULE)
    plugin_path(tmp_path)
    normkit.refresh()
    with pytest.raises(ValueError, match="'rows_rms' is already registered to 'Rows'"):
        normkit.register("rows_rms", normkit.LayerNorm)
    shutil.rmtree(tmp_path / "good_plugin-0.1.dist-info")
    assert normkit.refresh() == []
    assert "rows_rms" not in normkit.available()


def test_plugins_are_loaded_once_and_cached(monkeypatch):
    scans = []
    real = registry.metadata.entry_points

    def counting(**kwargs):
        scans.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(registry.metadata, "entry_points", counting)
    monkeypatch.setattr(registry, "_plugins", None)
    normkit.available()
    normkit.create("layer_norm", normalized_shape=3)
    normkit.available()
    assert scans == [{"group": "normkit.normalizers"}]
    normkit.refresh()
    assert len(scans) == 2


def test_a_registered_scheme_keeps_its_name_over_a_later_plugin(tmp_path, plugin_path,
                                                                monkeypatch):
    monkeypatch.setitem(registry._REGISTERED, "mine", normkit.LayerNorm)
    _distribution(tmp_path, "late_plugin", {"mine": "late_plugin:Rows"}, GOOD_MODULE)
    plugin_path(tmp_path)
    loaded, messages = _refresh_with_warnings()
    assert loaded == [] and messages == [
        "normkit plug-in 'mine' (late_plugin:Rows) skipped: its name is taken by "
        "LayerNorm, given to normkit.register"]
    assert normkit.create("mine", normalized_shape=2).__class__ is normkit.LayerNorm
