"""Where arrays live, and the small per-channel steps of the functional API
on either side.

A *device array* is anything exposing ``__cuda_array_interface__`` (Numba
device arrays, CuPy arrays, PyTorch CUDA tensors) or an array of Numba's CUDA
simulator.  This module imports ``numba.cuda`` (and :mod:`normkit._cuda`)
only once a device array shows up, so normkit imports and runs on machines
without numba-cuda or a GPU.

The helpers below (:func:`rstd`, :func:`update_running`, :func:`renorm`, ...)
compute with NumPy on host arrays and with tiny device kernels on device
arrays, so statistics never leave the device.
"""

import functools
import inspect
import itertools
import sys

import numpy as np

_SIMULATOR_ARRAYS = "numba.cuda.simulator.cudadrv.devicearray"


def is_device_array(a):
    """True for arrays that live on a CUDA device (or the CUDA simulator)."""
    if a is None or isinstance(a, (np.ndarray, np.generic)):
        return False
    try:
        if hasattr(a, "__cuda_array_interface__"):
            return True
    except Exception:  # torch CPU tensors raise on this attribute
        return False
    simulator = sys.modules.get(_SIMULATOR_ARRAYS)
    return simulator is not None and isinstance(a, simulator.FakeCUDAArray)


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
    """A host NumPy copy of ``a`` (host arrays are copied too)."""
    if is_device_array(a):
        return as_device_array(a).copy_to_host()
    return np.array(a, copy=True)


def to_device(a):
    """A device copy of host array ``a``."""
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def cuda_backend():
    """:mod:`normkit._cuda`, imported on first use (it needs numba.cuda)."""
    from . import _cuda
    return _cuda


# --------------------------------------------------------------------------
# per-channel steps, host or device
# --------------------------------------------------------------------------

def as_float64(a):
    """``a`` in float64 (device arrays are read in any float dtype by the
    kernels, so they are returned as they are)."""
    return a if is_device_array(a) else np.asarray(a, np.float64)


def rstd(var, eps):
    """``1 / sqrt(var + eps)`` in float64."""
    if is_device_array(var):
        gpu = cuda_backend()
        return gpu.channel_op(gpu.RSTD, var, eps=eps)
    return 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)


def reciprocal(a):
    """``1 / a`` in float64."""
    if is_device_array(a):
        gpu = cuda_backend()
        return gpu.channel_op(gpu.RECIPROCAL, a)
    return 1.0 / np.asarray(a, np.float64)


def rows(values, P):
    """Per-channel ``values`` ``(C,)`` as per-group rows ``(P, C)``: a
    broadcast view on the host, one row (broadcast by the kernels) on the
    device."""
    if is_device_array(values):
        return values.reshape(1, values.size)
    return np.broadcast_to(values, (P, values.size))


def update_running(running, batch, factor, n=None):
    """``running <- (1 - factor) * running + factor * mean_p(s * batch)`` in
    place, ``batch`` ``(P, C)``, ``s = n / (n - 1)`` (``n`` values per
    group, the unbiased correction) or 1 when ``n`` is None."""
    if is_device_array(running):
        cuda_backend().update_running(running, batch, factor,
                              1.0 if n is None else n / (n - 1))
        return
    values = batch[0] if len(batch) == 1 else batch.mean(axis=0)
    if n is not None:
        values = values * (n / (n - 1))
    running[...] = (1.0 - factor) * running + factor * values


def renorm(mean, var, running_mean, running_std, weight, bias, eps, rmax,
           dmax, factor):
    """Batch Renormalization's corrections from the batch ``mean`` and
    biased ``var`` (``(1, C)``) and the running values before this step.

    Returns ``(alpha, rstd, beta, r, d)``: ``alpha = r / sigma`` and
    ``rstd = 1 / sigma`` as ``(1, C)``, ``beta = bias + weight * d``,
    ``r`` and ``d`` as ``(C,)``; then updates ``running_mean`` and
    ``running_std`` in place (see :func:`normkit.functional.batch_renorm`).
    """
    if is_device_array(mean):
        return cuda_backend().renorm(mean, var, running_mean, running_std, weight,
                             bias, eps, rmax, dmax, factor)
    C = running_mean.size
    rm = np.asarray(running_mean, np.float64)
    rs = np.asarray(running_std, np.float64)
    mu, sigma = mean[0], np.sqrt(var[0] + eps)
    r = np.clip(sigma / rs, 1.0 / rmax, rmax)
    d = np.clip((mu - rm) / rs, -dmax, dmax)
    gamma = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    beta = gamma * d if bias is None else np.asarray(bias, np.float64) + gamma * d
    running_mean += factor * (mu - rm)
    running_std += factor * (sigma - rs)
    return (r / sigma).reshape(1, C), (1.0 / sigma).reshape(1, C), beta, r, d


def gscale(weight, r):
    """Multiplier of ``xhat`` in the output, ``weight * r`` (flat), or
    None when both are None."""
    if weight is None:
        return r
    flat = weight.reshape(weight.size)
    if is_device_array(weight):
        if r is None:
            return flat
        gpu = cuda_backend()
        return gpu.channel_op(gpu.PRODUCT, flat, r)
    flat = np.asarray(flat, np.float64)
    return flat if r is None else flat * r


def renorm_dweight(sum_dy_xhat, sum_dy, r, d):
    """``sum(dy * (xhat * r + d)) = sum_dy_xhat * r + sum_dy * d``."""
    if is_device_array(sum_dy):
        gpu = cuda_backend()
        return gpu.channel_op(gpu.RENORM_DWEIGHT, sum_dy_xhat, r, sum_dy, d)
    return sum_dy_xhat * r + sum_dy * d


def cast(a, shape, dtype):
    """``a`` reshaped to ``shape`` and converted to ``dtype``."""
    if is_device_array(a):
        from numba import cuda
        gpu = cuda_backend()
        return gpu.channel_op(gpu.COPY, a,
                              out=cuda.device_array(shape, dtype))
    return a.reshape(shape).astype(dtype)
