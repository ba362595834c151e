"""Argument validation shared by the functional API and the schemes.

Every check raises before anything is computed or updated, with a message
that names the argument (and the function or layer, ``func``), what was
expected and what was given.  Plug-in schemes use the same checks.
"""

import math
import numbers

import numpy as np

from .backend import is_device_array
from .backend.storage import is_bfloat16

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
    or a bfloat16 ndarray (``ml_dtypes.bfloat16``), else raise TypeError."""
    if not isinstance(x, np.ndarray) and not is_device_array(x):
        raise TypeError(f"{func}: {name} must be a NumPy array (or a CUDA "
                        f"device array), got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES and not (isinstance(x, np.ndarray)
                                            and is_bfloat16(x.dtype)):
        raise TypeError(f"{func}: {name} must have dtype float16, float32, "
                        f"float64 or (NumPy arrays) bfloat16, got {x.dtype}")
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
    """``eps`` as a float; raises ValueError unless finite and ``>= 0``.

    ``eps = 0`` is accepted (a group of zero variance then normalizes to
    NaN, as in PyTorch); batch-statistics schemes add
    :func:`check_batch_eps`.
    """
    if not is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{func}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_batch_eps(eps, func):
    """PyTorch 2.13's rule for batch normalization with batch statistics
    (training, or no running statistics): ``eps > 0``, with its message."""
    if eps <= 0:
        raise ValueError(f"{func} eps must be positive during training, but "
                         f"got {eps}")


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
    """``value`` as an int; raises ValueError unless an integer ``> 0``."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{func}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_count(value, name, func):
    """``value`` as an int; raises ValueError unless an integer ``>= 0``."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{func}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def values_per_channel_error(x):
    """PyTorch's error for training with one value per channel."""
    return ValueError("Expected more than 1 value per channel when training, "
                      f"got input size {tuple(x.shape)}")


def check_channels(func, shape, axis, num_features=None, min_axis=0,
                   allowed_ndim=None, feature_name="num_features", hint=""):
    """Check the channel ``axis`` of an input of ``shape`` (at least 2-D, or
    one of ``allowed_ndim``) and, when given, that it holds
    ``num_features`` channels (ValueError naming ``feature_name``, then
    ``hint``); returns the axis normalized to ``>= 0``."""
    ndim = len(shape)
    if allowed_ndim is not None and ndim not in allowed_ndim:
        want = " or ".join(f"{n}-D" for n in sorted(allowed_ndim))
        raise ValueError(f"{func}: expected {want} input x, got {ndim}-D input "
                         f"of shape {tuple(shape)}")
    if ndim < 2:
        raise ValueError(f"{func}: expected input x with at least 2 "
                         f"dimensions, got shape {tuple(shape)}")
    ax = check_axis(axis, ndim, func, min_axis=min_axis)
    if num_features is not None and shape[ax] != num_features:
        raise ValueError(f"{func}: {feature_name}={num_features} does not "
                         f"match the {shape[ax]} channels on axis {axis} of "
                         f"the input of shape {tuple(shape)}{hint}")
    return ax


def check_channel_input(func, x, axis, weight, bias, min_axis=0, running=(),
                        running_required=False):
    """Validate a channel-axis function's input and per-channel arrays.

    ``running`` holds ``(name, array)`` pairs of running statistics: all or
    none must be given (all when ``running_required``).  Returns the
    normalized axis and the number of channels.
    """
    check_input(x, "x", func)
    ax = check_channels(func, x.shape, axis, min_axis=min_axis)
    C = x.shape[ax]
    for name, value in (("weight", weight), ("bias", bias)):
        check_param(value, name, (C,), func)
    missing = 0
    for name, value in running:
        if value is not None:
            check_running(value, name, (C,), func)
        elif running_required:
            raise ValueError(f"{func}: {name} is required, got None")
        else:
            missing += 1
    if 0 < missing < len(running):
        names = " and ".join(name for name, _ in running)
        raise ValueError(f"{func}: give both {names} or neither")
    return ax, C


def check_normalized_shape(normalized_shape, func):
    """``normalized_shape`` (an int or a tuple of ints) as a non-empty tuple
    of ints ``>= 0`` (a zero, as in PyTorch, for inputs without values)."""
    if is_int(normalized_shape):
        normalized_shape = (normalized_shape,)
    try:
        shape = tuple(int(d) for d in normalized_shape)
    except TypeError:
        raise TypeError(f"{func}: normalized_shape must be an int or a tuple "
                        f"of ints, got {normalized_shape!r}") from None
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"{func}: normalized_shape must be a non-empty tuple "
                         f"of ints >= 0, got {normalized_shape!r}")
    return shape


def check_trailing(func, shape, normalized_shape):
    """Raise unless the input ``shape`` ends with ``normalized_shape``."""
    n = len(normalized_shape)
    if len(shape) < n or tuple(shape[len(shape) - n:]) != normalized_shape:
        raise ValueError(f"{func}: normalized_shape {normalized_shape} must "
                         f"match the trailing dimensions of x, got input "
                         f"shape {tuple(shape)}")


def _extent(a):
    """``(first, stop, layout)``: the byte range array ``a`` (host or
    device) spans and ``(start, shape, strides)`` to compare layouts."""
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:  # NumPy arrays, and the CUDA simulator's arrays
        iface = a.__array_interface__
    start = iface["data"][0]
    shape = tuple(iface["shape"])
    itemsize = np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is None:  # C order
        strides, step = [], itemsize
        for size in reversed(shape):
            strides.insert(0, step)
            step *= size
    strides = tuple(strides)
    if math.prod(shape) == 0:
        return start, start, (start, shape, strides)
    low = start + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = start + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides))
    return low, high + itemsize, (start, shape, strides)


def overlap(a, b):
    """How arrays ``a`` and ``b`` (both host or both device) share memory:
    ``"none"``, ``"same"`` (the same elements in the same layout: an
    elementwise pass may write one while reading the other) or
    ``"partial"`` (any other overlap of their byte ranges).  Host arrays
    whose byte ranges are apart (NumPy's ``may_share_memory``, 0.2 us)
    skip the layouts (3 us an array)."""
    if a is b and math.prod(a.shape) > 0:
        return "same"
    if (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            and not np.may_share_memory(a, b)):
        return "none"
    a_low, a_high, a_layout = _extent(a)
    b_low, b_high, b_layout = _extent(b)
    if a_high <= b_low or b_high <= a_low:
        return "none"
    return "same" if a_layout == b_layout else "partial"


def check_out(out, like, func, name="out", like_name="x"):
    """Check an output buffer before anything is computed or updated.

    ``out`` must be an array of the same kind as ``like`` (a host NumPy
    array for a host input, a CUDA device array for a device input), of
    ``like``'s shape and dtype, writeable, and either separate from
    ``like`` or ``like`` itself (the same memory in the same layout:
    elementwise passes may write in place; a partial overlap raises).
    Returns ``out``, or None when ``out`` is None.

    Raises
    ------
    TypeError
        For an ``out`` of another kind (host / device) or dtype.
    ValueError
        For another shape, a read-only array, or a partial overlap.
    """
    if out is None:
        return None
    on_device = is_device_array(like)
    if is_device_array(out) != on_device or not (
            on_device or isinstance(out, np.ndarray)):
        want = "a CUDA device array" if on_device else "a host NumPy array"
        got = ("a CUDA device array" if is_device_array(out)
               else type(out).__name__)
        raise TypeError(f"{func}: {name} must be {want} like {like_name}, "
                        f"got {got}")
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{func}: {name} must have {like_name}'s shape "
                         f"{tuple(like.shape)}, got {tuple(out.shape)}")
    if out.dtype is not like.dtype and np.dtype(out.dtype) != np.dtype(like.dtype):
        raise TypeError(f"{func}: {name} must have {like_name}'s dtype "
                        f"{np.dtype(like.dtype)}, got {np.dtype(out.dtype)}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{func}: {name} must be writeable, got a "
                         f"read-only array")
    if overlap(out, like) == "partial":
        raise ValueError(f"{func}: {name} overlaps {like_name} partially; "
                         f"pass {like_name} itself (in place) or an array "
                         f"of its own")
    return out
