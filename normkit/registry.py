"""A small registry of normalizers by name.

``available()`` lists the names, ``create(name, **kwargs)`` builds a layer and
``register(name, cls)`` adds a user's scheme (a :class:`~normkit.Normalizer`
subclass, or any class following the same protocol).
"""

from . import layers

_REGISTRY = {
    "batch_norm": layers.BatchNorm,
    "instance_norm": layers.InstanceNorm,
    "layer_norm": layers.LayerNorm,
    "group_norm": layers.GroupNorm,
    "batch_renorm": layers.BatchRenorm,
}

def available():
    """Sorted names of the registered normalizers."""
    return sorted(_REGISTRY)


def create(name, **kwargs):
    """Build the normalizer registered as ``name`` with ``kwargs``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"create: unknown normalizer {name!r}; available: "
                         f"{', '.join(available())}") from None
    return cls(**kwargs)


def register(name, cls):
    """Register ``cls`` under ``name``; a taken name is an error.

    ``cls`` is a class (or factory) called as ``cls(**kwargs)`` by
    :func:`create`; subclass :class:`normkit.Normalizer` to get the layer
    protocol (forward, backward, train/eval, state_dict) for free.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register: name must be an identifier string, got "
                         f"{name!r}")
    if name in _REGISTRY:
        raise ValueError(f"register: {name!r} is already registered to "
                         f"{_REGISTRY[name].__name__}")
    if not callable(cls):
        raise TypeError(f"register: cls must be a class or factory, got "
                        f"{type(cls).__name__}")
    _REGISTRY[name] = cls
    return cls
