"""How the CPU kernels read and write 16-bit floats in place.

Numba's CPU target has no float16 (nor bfloat16) type, so a 16-bit input
reaches the kernels as its raw bits, and every read and write of an element
goes through :func:`load` and :func:`store`, which convert one value to and
from the *compute type* (float32; float32 and float64 arrays are read as
they are).  No widened copy of the input and no float32 copy of the output
is ever made: a float16 pass moves half the bytes of a float32 one.

Storage codes (the dtype of the flat array a kernel receives):

- float32 and float64 arrays: themselves, no conversion;
- float16 (IEEE binary16): its ``uint16`` bits, converted by the CPU's
  F16C instructions (``vcvtph2ps`` / ``vcvtps2ph``) where it has them,
  else by the integer bit patterns of :mod:`normkit.backend.half`;
- bfloat16 (``ml_dtypes``): its ``int16`` bits, the top 16 bits of a
  float32, rounded to nearest even on the way back.

float16 narrowing rounds to nearest, ties to even, as
``astype(np.float16)`` does; bfloat16 narrowing rounds the same way, keeps
infinities and turns NaN into a quiet NaN (as ``ml_dtypes`` does).  A
float64 value is rounded once, as NumPy's cast rounds it (through a
float32 rounded to odd, ``_odd_single``), not to float32 first.
Accumulation in the kernels is in float32 or wider whatever the storage.
"""

from llvmlite import binding, ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from . import half

__all__ = ["storage_view", "compute_dtype", "is_bfloat16", "load", "store",
           "compute_empty", "compute_zero", "product_zero", "F16C",
           "FLOAT32", "FLOAT64"]

#: True when the CPU converts float16 in hardware (x86 F16C); the kernels
#: then use LLVM's ``half`` conversions, which vectorise.
F16C = bool(binding.get_host_cpu_features().get("f16c", False))

_inline = njit(cache=True, nogil=True, inline="always")


def is_bfloat16(dtype):
    """True for the bfloat16 dtype of ``ml_dtypes`` (recognised by name, so
    that normkit never imports ``ml_dtypes`` itself)."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def storage_view(x):
    """The flat, C-contiguous array the CPU kernels receive for ``x``.

    float32 and float64 data as they are; float16 as its ``uint16`` bits
    and bfloat16 as its ``int16`` bits (no conversion: the kernels convert
    element by element).  A non-contiguous ``x`` is copied once.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    dtype = flat.dtype
    if dtype is FLOAT32 or dtype is FLOAT64:
        # identity first: right after other work has left the caches, each
        # dtype comparison costs microseconds, an identity test nothing
        return flat
    if dtype == np.float16:
        return flat.view(np.uint16)
    if is_bfloat16(dtype):
        return flat.view(np.int16)
    return flat


#: The float32 and float64 dtypes, which NumPy's arrays of native byte
#: order share: tested by identity first, before any comparison.
FLOAT32, FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def compute_dtype(dtype):
    """The dtype the kernels compute in for storage (or array) ``dtype``:
    float32 for every 16-bit storage, else ``dtype`` itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


# --------------------------------------------------------------------------
# element conversions
# --------------------------------------------------------------------------

@intrinsic
def _half_bits_to_single_f16c(typingctx, bits):
    """float16 bits -> float32 through LLVM ``fpext half``."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()),
                             ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _single_to_half_bits_f16c(typingctx, value):
    """float32 -> float16 bits through LLVM ``fptrunc`` (round to nearest
    even)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()),
                               ir.IntType(16))
    return types.uint16(types.float32), codegen


@_inline
def _half_to_single(bits):
    if F16C:
        return _half_bits_to_single_f16c(bits)
    return np.uint32(half.half_to_single_bits(np.int64(bits))).view(np.float32)


@_inline
def _single_to_half(value):
    if F16C:
        return _single_to_half_bits_f16c(np.float32(value))
    return np.uint16(half.single_to_half_bits(
        np.int64(np.float32(value).view(np.uint32))))


@_inline
def _bfloat16_to_single(bits):
    return np.uint32(np.uint32(np.uint16(bits)) << np.uint32(16)).view(np.float32)


@intrinsic
def _single_to_bfloat16_bits(typingctx, value):
    """float32 -> bfloat16 bits, rounded to nearest even on the 16 dropped
    bits (a carry into the exponent is right, and turns the largest finite
    values into inf); a NaN keeps its top bits and becomes quiet.

    Written in LLVM IR so that every step stays 32 bits wide: the same
    steps in Numba widen its integers to 64 bits, and the NaN select then
    kept the vectorised loops of the maps at 64-bit lanes, half as many
    per instruction (a channels-last map storing bfloat16 took about 0.25
    ns a value against 0.11 for float16).
    """
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        top = builder.lshr(bits, i32(16))
        round_up = builder.add(builder.and_(top, i32(1)), i32(0x7FFF))
        rounded = builder.lshr(builder.add(bits, round_up), i32(16))
        quiet = builder.or_(top, i32(0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet, rounded),
                             ir.IntType(16))
    return types.int16(types.float32), codegen


@_inline
def _single_to_bfloat16(value):
    return _single_to_bfloat16_bits(np.float32(value))


@_inline
def _odd_single(value):
    """float64 ``value`` as a float32 rounded to odd: toward zero, with the
    last bit set where that dropped anything.  Rounded on to float16 or
    bfloat16 (to nearest, ties to even) it gives ``value`` rounded once:
    float32 keeps more than two bits beyond either, so the odd bit settles
    the ties that rounding to the nearest float32 first would make of
    values just off them (``1 + 2**-11 + 2**-40`` became the tie ``1 +
    2**-11`` and then float16 1.0, where a single rounding gives ``1 +
    2**-10``)."""
    single = np.float32(value)
    wide = np.float64(single)
    if wide == value or value != value or np.isinf(single):
        return single
    bits = single.view(np.uint32)
    if abs(wide) > abs(value):  # rounded away from zero: one step back
        bits = np.uint32(bits - np.uint32(1))
    return np.uint32(bits | np.uint32(1)).view(np.float32)


# --------------------------------------------------------------------------
# what the kernels call
# --------------------------------------------------------------------------

def load(a, index):
    """``a[index]`` as a value of the compute type (usable in kernels)."""
    return a[index]


def store(a, index, value):
    """``a[index] = value`` converted to the storage type, rounded once
    (usable in kernels)."""
    a[index] = value


def compute_zero(a):
    """Zero of the compute type of storage array ``a`` (usable in kernels)."""
    return a.dtype.type(0)


def product_zero(a):
    """Zero of the type in which the backward sums of storage array ``a``
    form their products and sum each tile (usable in kernels): float32 for
    16-bit storage, whose values carry 11 or 8 significant bits, so that
    those loops vectorise 16 wide; float64 otherwise, so that a float32
    gradient keeps every digit it had."""
    return _product_scalar(a.dtype)(0)


def _product_scalar(dtype):
    """The NumPy scalar type of :func:`product_zero` for storage ``dtype``."""
    return np.float32 if np.dtype(dtype).itemsize == 2 else np.float64


def compute_empty(a, n):
    """``np.empty(n)`` of the compute type of ``a`` (usable in kernels)."""
    return np.empty(n, a.dtype)


@overload(load)
def _load_impl(a, index):
    dtype = a.dtype
    if dtype == types.uint16:
        return lambda a, index: _half_to_single(a[index])
    if dtype == types.int16:
        return lambda a, index: _bfloat16_to_single(a[index])
    return lambda a, index: a[index]


@_inline
def _nearest_single(value):
    """``value`` as a float32, rounded to nearest (no change for one)."""
    return np.float32(value)


@overload(store)
def _store_impl(a, index, value):
    dtype = a.dtype
    # a float64 value reaches 16 bits through a float32 rounded to odd, so
    # that it is rounded once
    wide = isinstance(value, types.Float) and value.bitwidth == 64
    single = _odd_single if wide else _nearest_single
    if dtype == types.uint16:
        def impl(a, index, value):
            a[index] = _single_to_half(single(value))
    elif dtype == types.int16:
        def impl(a, index, value):
            a[index] = _single_to_bfloat16(single(value))
    else:
        def impl(a, index, value):
            a[index] = value
    return impl


def _compute_scalar(a):
    """The NumPy scalar type of :func:`compute_dtype` for the Numba array
    type ``a``."""
    return compute_dtype(as_dtype(a.dtype)).type


@overload(compute_zero)
def _compute_zero_impl(a):
    zero = _compute_scalar(a)(0)
    return lambda a: zero


@overload(product_zero)
def _product_zero_impl(a):
    zero = _product_scalar(as_dtype(a.dtype))(0)
    return lambda a: zero


@overload(compute_empty)
def _compute_empty_impl(a, n):
    dtype = _compute_scalar(a)
    return lambda a, n: np.empty(n, dtype)
