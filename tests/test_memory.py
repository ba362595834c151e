"""No pass allocates scratch of the input's size (issue: memory).

The peak of the allocations traced by ``tracemalloc`` during one warm
training forward or backward pass (NumPy's arrays and Numba's, which both
report to it) must stay within what the pass returns plus a bound that does
not grow with the input: :data:`SLACK` bytes.  Counted as returned: the
output (or ``dx``), the saved statistics, the parameter gradients and,
for parameters of fewer than
:data:`~normkit.schemes.base.DIRECT_GRADIENTS` values, the float64 sums
those gradients are rounded from (two per parameter; they are summed over
rows in float64 for accuracy).  Wider parameters get their gradients
written by the backend in their own dtype: no float64 array of their
size, only the sum of a parameter the layer lacks (RMSNorm's bias) in
the parameters' dtype.  Allocation counts are deterministic: these are
not timings.

Every input here holds 2**18 values or more (512 KiB in float16), so
scratch of the input's size (a widened float16 copy, a partial per work
item as wide as a row) would exceed the bound.
"""

import tracemalloc

import numpy as np
import pytest

import normkit
from normkit.schemes.base import DIRECT_GRADIENTS

#: Bytes a pass may allocate beyond what it returns, whatever the input size.
SLACK = 256 * 1024

DTYPES = ["float32", "float16", "float64", "bfloat16"]


def _dtype(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name)


def _nbytes(value):
    """Bytes of every array in ``value`` (arrays, tuples, Saved records,
    whose reference to the caller's weight allocates nothing)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dict__"):  # a Saved record: not the caller's weight
        return sum(_nbytes(v) for k, v in vars(value).items() if k != "weight")
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _peak(fn):
    """Peak traced bytes above the starting point during ``fn()``, and its
    result."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


def _channels(shape, axis):
    return shape[axis]


#: name -> (shape, forward(x, params) -> (y, saved), backward name, params)
def _cases():
    first = (8, 32, 32, 32)
    last = (8, 32, 32, 32)
    return {
        "batch_norm-first": (first, lambda x, p: normkit.batch_norm(
            x, weight=p, bias=p, training=True, return_saved=True), 32),
        "batch_norm-last": (last, lambda x, p: normkit.batch_norm(
            x, weight=p, bias=p, training=True, axis=-1, return_saved=True), 32),
        "instance_norm": (first, lambda x, p: normkit.instance_norm(
            x, weight=p, bias=p, return_saved=True), 32),
        "group_norm-first": (first, lambda x, p: normkit.group_norm(
            x, 8, weight=p, bias=p, return_saved=True), 32),
        "group_norm-last": (last, lambda x, p: normkit.group_norm(
            x, 8, weight=p, bias=p, axis=-1, return_saved=True), 32),
        "batch_renorm": (first, lambda x, p: normkit.batch_renorm(
            x, running_mean=np.zeros(32), running_std=np.ones(32), weight=p,
            bias=p, training=True, return_saved=True), 32),
        "ghost_batch_norm": (first, lambda x, p: normkit.ghost_batch_norm(
            x, virtual_batch_size=4, weight=p, bias=p, training=True,
            return_saved=True), 32),
        "layer_norm-rows": ((512, 512), lambda x, p: normkit.layer_norm(
            x, (512,), weight=p, bias=p, return_saved=True), 512),
        "layer_norm-sample": (first, lambda x, p: normkit.layer_norm(
            x, first[1:], return_saved=True), None),
        "layer_norm-two-rows": ((2, 1 << 17), lambda x, p: normkit.layer_norm(
            x, (1 << 17,), weight=p, bias=p, return_saved=True), 1 << 17),
        "layer_norm-one-row": ((1, 1 << 18), lambda x, p: normkit.layer_norm(
            x, (1 << 18,), return_saved=True), None),
        "rms_norm-rows": ((512, 512), lambda x, p: normkit.rms_norm(
            x, (512,), weight=p, return_saved=True), 512),
        "rms_norm-two-rows": ((2, 1 << 17), lambda x, p: normkit.rms_norm(
            x, (1 << 17,), weight=p, return_saved=True), 1 << 17),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_passes_allocate_outputs_only(name, dtype, rng):
    shape, forward, n_params = CASES[name]
    dt = _dtype(dtype)
    x = (3 + 2 * rng.standard_normal(shape, np.float32)).astype(dt)
    dy = rng.standard_normal(shape, np.float32).astype(dt)
    params = None if n_params is None else np.ones(n_params, dt)
    variant = name.split("-")[0]
    backward = getattr(normkit, f"{variant}_backward")

    y, saved = forward(x, params)          # warm-up: compilation, plans
    backward(dy, x, saved)

    peak, (y, saved) = _peak(lambda: forward(x, params))
    returned = _nbytes(y) + _nbytes(saved)
    assert peak <= returned + SLACK, (
        f"forward allocated {peak / x.nbytes:.2f}x the input; it returns "
        f"{returned / x.nbytes:.2f}x")

    peak, grads = _peak(lambda: backward(dy, x, saved))
    if n_params is None:
        sums = 0
    elif n_params < DIRECT_GRADIENTS:
        sums = 2 * 8 * n_params
    else:  # the sum of a missing parameter, in the parameters' dtype
        sums = n_params * np.dtype(dt).itemsize * (variant == "rms_norm")
    returned = _nbytes(grads) + sums
    assert peak <= returned + SLACK, (
        f"backward allocated {peak / x.nbytes:.2f}x the input; it returns "
        f"{returned / x.nbytes:.2f}x")
