"""Sphinx configuration of the normkit documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (the
``docs`` extra installs what it needs).
"""

import normkit

project = "normkit"
author = "the normkit developers"
copyright = "2026, the normkit developers"
version = release = normkit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]

# API reference: one page per module (listed in api.rst) and one per public
# name, generated from the docstrings.  A module's public names are its
# ``__all__`` when it has one.
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"member-order": "bysource"}

# Class pages list their members through the autosummary class template
# (_templates/autosummary/class.rst), not through numpydoc's own tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

default_role = "code"

html_theme = "pydata_sphinx_theme"
html_title = f"normkit {release}"
html_static_path = ["_static"]
html_theme_options = {"navigation_with_keys": False}
