"""Argument validation shared by the functional API and the layers.

Every check raises before anything is computed or updated, with a message
that names the argument, what was expected and what was given.
"""

import math
import numbers

import numpy as np

from ._device import is_device_array

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def is_int(value):
    """True for Python or NumPy integers, False for bools."""
    if type(value) is int:
        return True
    return (isinstance(value, numbers.Integral)
            and not isinstance(value, (bool, np.bool_)))


def is_real(value):
    """True for Python or NumPy real numbers, False for bools."""
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_input(x, name, func):
    """Return ``x`` if it is a float16/32/64 ndarray or CUDA device array,
    else raise TypeError."""
    if not isinstance(x, np.ndarray) and not is_device_array(x):
        raise TypeError(f"{func}: {name} must be a NumPy array (or a CUDA "
                        f"device array), got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{func}: {name} must have dtype float16, float32 or "
                        f"float64, got {x.dtype}")
    return x


def check_ndim(x, func, min_ndim=None, allowed=None, name="x"):
    """Raise ValueError unless ``x.ndim`` is in ``allowed`` / ``>= min_ndim``."""
    if allowed is not None and x.ndim not in allowed:
        want = " or ".join(f"{n}-D" for n in sorted(allowed))
        raise ValueError(f"{func}: expected {want} input {name}, got "
                         f"{x.ndim}-D input of shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{func}: expected input {name} with at least "
                         f"{min_ndim} dimensions, got shape {x.shape}")


def check_axis(axis, ndim, func, min_axis=0):
    """Normalize a channel ``axis`` to ``[min_axis, ndim)`` or raise."""
    if not is_int(axis):
        raise TypeError(f"{func}: axis must be an integer, got {axis!r}")
    ax = int(axis) + ndim if axis < 0 else int(axis)
    if not min_axis <= ax < ndim:
        note = " (axis 0 is the batch axis)" if min_axis else ""
        raise ValueError(f"{func}: axis must be in [{min_axis - ndim}, "
                         f"{ndim - 1}] for {ndim}-D input{note}, got {axis}")
    return ax


def check_eps(eps, func):
    if not is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{func}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum, func, num_batches_tracked=None, updating=False):
    """Weight of the new batch in a running-statistics update.

    ``momentum`` in [0, 1], or None for the cumulative average
    ``1 / (num_batches_tracked + 1)`` (``num_batches_tracked`` counting the
    batches already averaged in).
    """
    if momentum is None:
        if not updating:
            return None
        if not is_int(num_batches_tracked) or num_batches_tracked < 0:
            raise ValueError(
                f"{func}: momentum=None (cumulative average) needs "
                f"num_batches_tracked, the number of batches already averaged "
                f"in, as an integer >= 0; got {num_batches_tracked!r}")
        return 1.0 / (int(num_batches_tracked) + 1)
    if not is_real(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{func}: momentum must be a number in [0, 1] or None, "
                         f"got {momentum!r}")
    return float(momentum)


def check_param(value, name, shape, func):
    """Check an optional parameter array of an exact shape."""
    if value is None:
        return None
    check_input(value, name, func)
    if value.shape != tuple(shape):
        raise ValueError(f"{func}: {name} must have shape {tuple(shape)}, got "
                         f"{value.shape}")
    return value


def check_running(value, name, shape, func):
    """Check a running-statistics buffer: right shape, float, writeable."""
    check_param(value, name, shape, func)
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        raise ValueError(f"{func}: {name} is updated in place and must be "
                         f"writeable")
    return value


def check_positive_int(value, name, func):
    if not is_int(value) or value <= 0:
        raise ValueError(f"{func}: {name} must be a positive integer, got {value!r}")
    return int(value)
