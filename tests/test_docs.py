"""The documentation keeps up with the public API.

- Every public name (``normkit.__all__``) is listed in the API overview by
  task (docs/api.rst), which is what generates its page.
- Every public function and class has numpydoc ``Parameters`` (when it
  takes any) and ``Examples`` sections.

The Sphinx build itself (nitpicky, warnings as errors) and the doctests of
the pages run in CI after the docs extra is installed (.ci/run).
"""

import inspect
import re
import warnings
from pathlib import Path

import pytest

import normkit

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _public_callables():
    """(name, object) of every public function and class."""
    return [(name, getattr(normkit, name)) for name in normkit.__all__
            if inspect.isfunction(getattr(normkit, name))
            or inspect.isclass(getattr(normkit, name))]


def _takes_arguments(obj):
    """Whether a Parameters section has anything to describe."""
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return False
        obj = obj.__init__
        if obj is object.__init__:
            return False
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return True
    return any(name != "self" for name in params)


def missing_sections():
    """``{name: [missing section, ...]}`` over :func:`_public_callables`."""
    from numpydoc.docscrape import NumpyDocString

    missing = {}
    for name, obj in _public_callables():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # unknown sections etc.
            doc = NumpyDocString(inspect.getdoc(obj) or "")
        wanted = (["Parameters"] if _takes_arguments(obj) else []) + ["Examples"]
        absent = [section for section in wanted if not doc[section]]
        if absent:
            missing[name] = absent
    return missing


def test_every_public_name_is_in_the_api_overview():
    listed = set()
    for block in re.findall(r"\.\. autosummary::\n((?:   .*\n|\n)+)",
                            (DOCS / "api.rst").read_text()):
        for line in block.splitlines():
            entry = line.strip()
            if entry and not entry.startswith(":"):
                listed.add(entry.removeprefix("normkit."))
    assert sorted(set(normkit.__all__) - listed) == []


def test_every_public_callable_has_parameters_and_examples():
    pytest.importorskip("numpydoc")
    missing = missing_sections()
    assert not missing, "\n".join(f"{name}: {', '.join(sections)}"
                                  for name, sections in sorted(missing.items()))


if __name__ == "__main__":
    # python tests/test_docs.py: the names still missing sections.
    for name, sections in sorted(missing_sections().items()):
        print(f"{name}: missing {', '.join(sections)}")
