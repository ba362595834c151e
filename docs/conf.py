"""Sphinx configuration of the normkit documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(the ``docs`` extra installs what it needs).  The build is nitpicky: every
cross-reference must resolve, and CI's ``-W`` turns one that does not into
a failure.
"""

import importlib
import inspect
import re
from pathlib import Path

import normkit

project = "normkit"
author = "the normkit developers"
copyright = "2026, the normkit developers"
version = release = normkit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped inside the site (_static/mathjax), so formulas render
    # without network access and in a downloaded copy of the site.
    "sphinx-mathjax-offline",
    "numpydoc",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]

# Every :func:, :class:, ... must resolve.  The build has no network, so
# nothing is linked through intersphinx: names of other projects are written
# as plain ``literals`` on the pages; the exceptions below are types that
# numpydoc and autodoc produce themselves.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(numpy|np)\.(ndarray|dtype)"),
]

# API reference (api.rst): the public names are documented where users
# import them from, ``normkit.batch_norm``, ``normkit.BatchNorm2d``, ... (one
# page each, listed by task in api.rst); the module pages hold the module
# docstrings and the names that only the module exports.  A reference to the
# same object through its defining module (``normkit.functional.batch_norm``)
# links to the same page (see _link_aliases below).
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"member-order": "bysource"}


def _api_modules():
    """The modules listed under "Modules" in api.rst, in order."""
    text = (Path(__file__).parent / "api.rst").read_text()
    block = text.split(".. _api-modules:", 1)[1]
    # The entries are relative to api.rst's ``currentmodule:: normkit``.
    return ["normkit." + name
            for name in re.findall(r"^   ([\w.]+)$", block, flags=re.M)]


def _documented_elsewhere():
    """Module name -> the names of its ``__all__`` whose page is elsewhere.

    A name has one page: at the top level when it is ``normkit.<name>``
    (api.rst lists it by task), else on the page of the listed module that
    defines it.  Every other module that exports it links to that page.
    """
    modules = _api_modules()
    elsewhere = {}
    for modname in modules:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            top = name in normkit.__all__ and getattr(normkit, name) is obj
            home = getattr(obj, "__module__", None)
            defined_elsewhere = (
                home != modname and home in modules
                and name in getattr(importlib.import_module(home), "__all__", ()))
            if top or defined_elsewhere:
                elsewhere.setdefault(modname, []).append(name)
    return elsewhere


#: Members of layer classes that exist for new schemes (the extension
#: protocol): documented on the pages of the bases new schemes subclass
#: (EXTENSION_BASES), left off the user-facing layer pages.
EXTENSION_HOOKS = ("view", "centered", "state_names", "allowed_ndim",
                   "spread_name", "spread_init", "extra_repr", "bound",
                   "label", "update_running_stats", "normalize_running",
                   "normalize_tracked", "check_limits", "gradients")
EXTENSION_BASES = ("Normalizer", "RunningStatsNormalizer")

autosummary_context = {
    "reexported": _documented_elsewhere(),
    "extension_hooks": ", ".join(EXTENSION_HOOKS),
    "extension_bases": EXTENSION_BASES,
}

# Class pages list their members through the autosummary class template
# (_templates/autosummary/class.rst), not through numpydoc's own tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

default_role = "code"

html_theme = "pydata_sphinx_theme"
html_title = f"normkit {release}"
html_static_path = ["_static"]
html_css_files = ["normkit.css"]
html_theme_options = {
    "navigation_with_keys": False,
    # The pages are few: all of them in the header, none collapsed into
    # a "More" menu.
    "header_links_before_dropdown": 8,
    "secondary_sidebar_items": ["page-toc"],
}

# The left "Section Navigation" sidebar lists a section's sub-pages: only
# the pages under the API reference have any (and the API reference itself
# is their overview).  Every top-level page gets no left sidebar: an empty
# one took a third of the width.
html_sidebars = {page.stem: [] for page in Path(__file__).parent.glob("*.rst")}


# ---------------------------------------------------------------------------
# One object, one page: references through another import path
# ---------------------------------------------------------------------------

def _lookup(path):
    """The object a dotted ``normkit...`` path names, or None."""
    parts = path.split(".")
    if parts[0] != "normkit":
        return None
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _key(obj):
    """Identity of an object with a page: modules, classes, functions and
    the members of classes (not constants, which may be shared)."""
    obj = getattr(obj, "__func__", obj)     # staticmethod, classmethod
    if isinstance(obj, property) or inspect.ismodule(obj) or inspect.isclass(obj) \
            or inspect.isfunction(obj) or callable(obj):
        return id(obj)
    return None


def _documented(env):
    """Object identity -> the name it is documented under."""
    cache = getattr(env, "_normkit_documented", None)
    if cache is None:
        cache = {}
        for name, entry in env.get_domain("py").objects.items():
            if entry.aliased:
                continue
            obj = _lookup(name)
            key = _key(obj)
            if key is None:
                continue
            # A method inherited by several documented classes: link to the
            # class that defines it.
            own = name.endswith("." + getattr(obj, "__qualname__", "\0"))
            if own or key not in cache:
                cache[key] = name
        env._normkit_documented = cache
    return cache


def _link_aliases(app, env, node, contnode):
    """Resolve a Python reference to an object documented under another
    name: ``normkit.functional.batch_norm`` -> ``normkit.batch_norm``, and
    ``normkit.layers.Normalizer.centered`` -> ``normkit.Normalizer.centered``.

    The candidates are the target as written and, for a relative name
    inside a docstring, qualified by the current module and class; the
    longest leading part of a candidate that is a documented object is
    replaced by the name it is documented under.  A relative name that is
    none of these links where exactly one documented name ends with it
    (a docstring's summary line shown in a table of another module).
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates.append(f"{module}.{target}")
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
    objects = env.get_domain("py").objects
    documented = _documented(env)
    for candidate in candidates:
        parts = candidate.split(".")
        for split in range(len(parts), 0, -1):
            key = _key(_lookup(".".join(parts[:split])))
            if key is None or key not in documented:
                continue
            name = ".".join([documented[key]] + parts[split:])
            if name in objects and name != target:
                return _resolve(app, env, node, contnode, name)
            break
    if not target.startswith("normkit."):
        matches = [name for name in objects
                   if name.endswith("." + target) and not objects[name].aliased]
        if len(matches) == 1:
            return _resolve(app, env, node, contnode, matches[0])
    return None


def _resolve(app, env, node, contnode, name):
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)


def setup(app):
    app.connect("missing-reference", _link_aliases)
