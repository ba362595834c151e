"""Backends: where arrays live, and the one dispatch from an array to the
kernels that run on it.

normkit has two backends, each a module implementing the operations of
:class:`normkit.backend.protocol.Backend` over the canonical
:class:`~normkit.view.View`:

- :mod:`normkit.backend.cpu`: NumPy arrays, Numba ``njit(parallel=True)``;
- :mod:`normkit.backend.cuda`: CUDA device arrays, ``numba.cuda``
  (imported on first use, so normkit runs without numba-cuda or a GPU).

A *device array* is anything exposing ``__cuda_array_interface__`` (Numba
device arrays, CuPy arrays, PyTorch CUDA tensors) or an array of Numba's
CUDA simulator.  :func:`backend_for` is the only place that decides which
backend runs; nothing in either backend knows a normalizer by name.

Examples
--------
>>> import numpy as np
>>> from normkit import backend
>>> backend.backend_for(np.ones(3)).__name__
'normkit.backend.cpu'
"""

import functools
import importlib
import inspect
import itertools
import sys

import numpy as np

__all__ = ["backend_for", "channelwise", "is_device_array", "as_device_array", "same_device",
           "accepts_device_arrays", "to_host", "to_device"]

_SIMULATOR_ARRAYS = "numba.cuda.simulator.cudadrv.devicearray"


#: Types that are never device arrays: checked first, as most arguments of
#: a call are of these.
_HOST_TYPES = (np.ndarray, np.generic, bool, int, float, str, type(None))


def is_device_array(a):
    """True for arrays that live on a CUDA device (or the CUDA simulator)."""
    if isinstance(a, _HOST_TYPES):
        return False
    try:
        if hasattr(a, "__cuda_array_interface__"):
            return True
    except Exception:  # torch CPU tensors raise on this attribute
        return False
    simulator = sys.modules.get(_SIMULATOR_ARRAYS)
    return simulator is not None and isinstance(a, simulator.FakeCUDAArray)


def backend_for(x):
    """The backend module for array ``x``: :mod:`normkit.backend.cuda` for
    device arrays (imported on first use), :mod:`normkit.backend.cpu` for
    everything else."""
    if is_device_array(x):
        return importlib.import_module(f"{__name__}.cuda")
    return cpu


def as_device_array(a):
    """A Numba device array viewing the memory of device array ``a``
    (no copy; Numba's own arrays are returned as they are)."""
    if type(a).__module__.startswith("numba"):
        return a
    from numba import cuda
    return cuda.as_cuda_array(a)


def same_device(func, named):
    """Check that ``named`` arrays (name -> value) are all host or all device
    arrays and return them with device arrays as Numba device arrays.

    Raises
    ------
    TypeError
        When host NumPy arrays and device arrays are mixed.
    """
    device = [name for name, value in named.items() if is_device_array(value)]
    if not device:
        return named
    host = [name for name, value in named.items()
            if isinstance(value, np.ndarray)]
    if host:
        raise TypeError(f"{func}: {host[0]} is a host NumPy array but "
                        f"{device[0]} is a CUDA device array; put all arrays "
                        f"on the same side (numba.cuda.to_device or "
                        f".copy_to_host())")
    return {name: as_device_array(value) if name in device else value
            for name, value in named.items()}


def accepts_device_arrays(fn):
    """Decorator: device-array arguments of ``fn`` become Numba device arrays,
    and mixing them with host arrays raises TypeError (see
    :func:`same_device`).  Calls with host arrays only pass straight through."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not any(map(is_device_array, itertools.chain(args, kwargs.values()))):
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.arguments.update(same_device(fn.__name__, dict(bound.arguments)))
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def to_host(a):
    """A host NumPy copy of ``a`` (host arrays are copied too); device
    arrays are copied on the stream of
    :func:`normkit.backend.cuda.launch_stream`."""
    if is_device_array(a):
        return importlib.import_module(f"{__name__}.cuda").to_host(a)
    return np.array(a, copy=True)


def to_device(a):
    """A device copy of host array ``a`` (on the stream of
    :func:`normkit.backend.cuda.launch_stream`)."""
    return importlib.import_module(f"{__name__}.cuda").to_device(a)


from . import cpu  # noqa: E402  (the CPU backend needs the helpers above)
from .protocol import channelwise  # noqa: E402
