"""A small registry of normalizers by name.

``available()`` lists the names, ``create(name, **kwargs)`` builds a layer and
``register(name, cls)`` adds a user's scheme (a :class:`~normkit.Normalizer`
subclass, or any class following the same protocol).

Installed packages add schemes through the entry-point group
``normkit.normalizers`` (:data:`ENTRY_POINT_GROUP`): each entry point's name
is the scheme's name and its object the class or factory, e.g. in the
plug-in's ``pyproject.toml``::

    [project.entry-points."normkit.normalizers"]
    mean_only_batch_norm = "my_package:MeanOnlyBatchNorm"

Plug-ins are loaded lazily, on the first call of :func:`available`,
:func:`create` or :func:`register`, and cached; :func:`refresh` reloads them
(after installing a package into a running program).  ``import normkit``
never loads them, so a broken plug-in cannot break it: a plug-in that fails
to import, is not callable or clashes with a name already taken is skipped
with a :class:`PluginWarning` that names it (and, for a clash, the other
owner of the name).  Names are never overridden: built-in names and names
given to :func:`register` win over plug-ins, two plug-ins with one name are
both skipped, and :func:`register` with a taken name (plug-in names
included) raises ``ValueError``.
"""

import importlib
from importlib import metadata
import warnings

from . import schemes

#: The entry-point group scanned for plug-ins.
ENTRY_POINT_GROUP = "normkit.normalizers"

_BUILTIN = {
    "batch_norm": schemes.BatchNorm,
    "instance_norm": schemes.InstanceNorm,
    "layer_norm": schemes.LayerNorm,
    "group_norm": schemes.GroupNorm,
    "batch_renorm": schemes.BatchRenorm,
    "rms_norm": schemes.RMSNorm,
    "ghost_batch_norm": schemes.GhostBatchNorm,
    "weight_norm": schemes.WeightNorm,
    "spectral_norm": schemes.SpectralNorm,
}

#: Names given to :func:`register` in this program.
_REGISTERED = {}

#: Plug-ins loaded from entry points; None until first needed.
_plugins = None


class PluginWarning(UserWarning):
    """A ``normkit.normalizers`` plug-in was skipped (see the message).

    Examples
    --------
    Turn skipped plug-ins into errors in a test session:

    >>> import warnings
    >>> import normkit
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", normkit.PluginWarning)
    ...     names = normkit.available()
    """


def _owner(name):
    """Who holds ``name`` among built-ins and registered schemes, or None."""
    if name in _BUILTIN:
        return f"the built-in {_BUILTIN[name].__name__}"
    if name in _REGISTERED:
        return f"{_REGISTERED[name].__name__}, given to normkit.register"
    return None


def _load_plugins():
    """Load every entry point of :data:`ENTRY_POINT_GROUP`, skipping (with a
    :class:`PluginWarning`) those that fail, are not callable or clash."""
    by_name = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(entry.name, []).append(entry)
    plugins = {}
    for name, entries in by_name.items():
        where = " and ".join(f"normkit plug-in {name!r} ({entry.value})"
                             for entry in entries)
        if len(entries) > 1:
            problem = "they have the same name"
        elif _owner(name) is not None:
            problem = f"its name is taken by {_owner(name)}"
        elif not name.isidentifier():
            problem = "its name is not an identifier"
        else:
            try:
                cls = entries[0].load()
            except Exception as exc:  # any error of a third party's import
                problem = f"it failed to load: {type(exc).__name__}: {exc}"
            else:
                if callable(cls):
                    plugins[name] = cls
                    continue
                problem = (f"it is a {type(cls).__name__}, not a class or "
                           f"factory")
        warnings.warn(f"{where} skipped: {problem}", PluginWarning,
                      stacklevel=4)
    return plugins


def _schemes():
    """Every scheme by name, loading plug-ins on first use."""
    global _plugins
    if _plugins is None:
        _plugins = {}  # a plug-in that uses the registry while loading sees none
        _plugins = _load_plugins()
    return {**_plugins, **_BUILTIN, **_REGISTERED}


def refresh():
    """Forget the loaded plug-ins and scan the entry points again.

    Use it after installing or removing a plug-in package while the
    program runs (or after changing ``sys.path``).  Schemes given to
    :func:`register` stay.

    Returns
    -------
    list of str
        The sorted names of the plug-ins loaded.

    Examples
    --------
    >>> import normkit
    >>> isinstance(normkit.refresh(), list)
    True
    """
    global _plugins
    importlib.invalidate_caches()
    _plugins = {}
    _plugins = _load_plugins()
    return sorted(_plugins)


def available():
    """Sorted names of the registered normalizers (plug-ins included).

    Returns
    -------
    list of str

    Examples
    --------
    >>> import normkit
    >>> {"batch_norm", "group_norm", "rms_norm"} <= set(normkit.available())
    True
    """
    return sorted(_schemes())


def create(name, **kwargs):
    """Build the normalizer registered as ``name`` with ``kwargs``.

    Parameters
    ----------
    name : str
        A name of :func:`available`.
    **kwargs
        The scheme's constructor arguments.

    Returns
    -------
    Normalizer

    Raises
    ------
    ValueError
        For an unknown name (the message lists the available ones).

    Examples
    --------
    >>> import normkit
    >>> normkit.create("group_norm", num_groups=2, num_channels=8)
    GroupNorm(2, 8, eps=1e-05, axis=1)
    """
    schemes_by_name = _schemes()
    try:
        cls = schemes_by_name[name]
    except KeyError:
        raise ValueError(f"create: unknown normalizer {name!r}; available: "
                         f"{', '.join(sorted(schemes_by_name))}") from None
    return cls(**kwargs)


def register(name, cls):
    """Register ``cls`` under ``name``; a taken name is an error.

    ``cls`` is a class (or factory) called as ``cls(**kwargs)`` by
    :func:`create`; subclass :class:`normkit.Normalizer` to get the layer
    protocol (forward, backward, train/eval, state_dict) for free.  Names
    of built-ins and of loaded plug-ins are taken.

    Parameters
    ----------
    name : str
        An identifier not yet registered.
    cls : class or callable
        Called as ``cls(**kwargs)`` by :func:`create`.

    Returns
    -------
    cls, unchanged (so ``register`` works as a decorator's body).

    Raises
    ------
    ValueError, TypeError
        For a bad or taken name, or a ``cls`` that is not callable.

    Examples
    --------
    >>> import numpy as np
    >>> import normkit
    >>> class RowNorm(normkit.Normalizer):
    ...     def view(self, shape):
    ...         return normkit.View(shape[0], 1, 1, shape[1], 1)
    >>> _ = normkit.register("row_norm_example", RowNorm)
    >>> normkit.create("row_norm_example")(np.arange(6.0).reshape(2, 3)).shape
    (2, 3)
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register: name must be an identifier string, got "
                         f"{name!r}")
    taken = _schemes()
    if name in taken:
        raise ValueError(f"register: {name!r} is already registered to "
                         f"{getattr(taken[name], '__name__', taken[name])!r}")
    if not callable(cls):
        raise TypeError(f"register: cls must be a class or factory, got "
                        f"{type(cls).__name__}")
    _REGISTERED[name] = cls
    return cls
