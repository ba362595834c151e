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
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from . import half

__all__ = ["storage_view", "compute_dtype", "is_bfloat16", "load", "store",
           "compute_empty", "compute_zero", "product_zero", "stream",
           "stream_fence", "F16C", "SFENCE", "STREAM_LINE", "FLOAT32",
           "FLOAT64"]

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


# --------------------------------------------------------------------------
# streaming stores
# --------------------------------------------------------------------------

#: True on x86, whose ``sfence`` orders the streaming stores of
#: :func:`stream` before the stores that follow them.
SFENCE = bool(binding.get_host_cpu_features().get("sse2", False))

#: Bytes a streaming store writes at once: a cache line.
STREAM_LINE = 64


def stream(dst, src):
    """Copy 1-D ``src`` into ``dst`` (same size, both C-contiguous) with
    streaming stores, which bypass the caches, where both have one dtype;
    into a ``dst`` of another dtype, values converted by :func:`store`,
    ordinary stores (usable in kernels).

    An ordinary store first reads the line it writes into the cache (the
    core must own the line), so a map whose output goes on to memory moves
    three bytes a byte of output: the input, that read and the write.  A
    streaming (non-temporal) store writes whole lines to memory without
    reading them, two bytes a byte, and leaves the caches to the input.
    The cache lines wholly inside ``dst`` are written that way, 64 bytes a
    store; its head and tail, parts of lines it shares with its
    neighbours, by an ordinary copy.  Streaming stores are not ordered
    with ordinary ones: call :func:`stream_fence` after the last of a
    pass, before anything else reads what they wrote (one fence a pass: it
    waits for the stores to reach memory).  Worth it only for an output
    that does not stay in cache anyway: whoever reads ``dst`` next reads
    it from memory.
    """
    dst[:] = src


def stream_fence():
    """Order the streaming stores of :func:`stream` before every later
    store (``sfence`` on x86; nothing elsewhere) (usable in kernels)."""


@intrinsic
def _stream_lines(typingctx, dst, src):
    """:func:`stream` in LLVM IR: the head and tail copied by ``memcpy``,
    the lines between as ``<16 x i32>`` loads (unaligned) and stores
    marked ``!nontemporal`` (aligned to 64)."""
    def codegen(context, builder, signature, args):
        dst_type, src_type = signature.args
        dst_ary = context.make_array(dst_type)(context, builder, args[0])
        src_ary = context.make_array(src_type)(context, builder, args[1])
        i8p = ir.IntType(8).as_pointer()
        i64 = ir.IntType(64)
        size = context.get_abi_sizeof(context.get_data_type(dst_type.dtype))
        nbytes = builder.mul(dst_ary.nitems, i64(size))
        dst_p = builder.bitcast(dst_ary.data, i8p)
        src_p = builder.bitcast(src_ary.data, i8p)
        misalign = builder.and_(builder.ptrtoint(dst_p, i64),
                                i64(STREAM_LINE - 1))
        head = builder.and_(builder.sub(i64(STREAM_LINE), misalign),
                            i64(STREAM_LINE - 1))
        head = builder.select(builder.icmp_unsigned("<", nbytes, head),
                              nbytes, head)
        cgutils.raw_memcpy(builder, dst_p, src_p, head, 1)
        lines = builder.udiv(builder.sub(nbytes, head), i64(STREAM_LINE))
        line = ir.VectorType(ir.IntType(32), STREAM_LINE // 4).as_pointer()
        nontemporal = builder.module.add_metadata([ir.IntType(32)(1)])
        with cgutils.for_range(builder, lines) as loop:
            offset = builder.add(head, builder.mul(loop.index,
                                                   i64(STREAM_LINE)))
            value = builder.load(builder.bitcast(
                builder.gep(src_p, [offset]), line), align=1)
            store = builder.store(value, builder.bitcast(
                builder.gep(dst_p, [offset]), line), align=STREAM_LINE)
            store.set_metadata("nontemporal", nontemporal)
        done = builder.add(head, builder.mul(lines, i64(STREAM_LINE)))
        cgutils.raw_memcpy(builder, builder.gep(dst_p, [done]),
                           builder.gep(src_p, [done]),
                           builder.sub(nbytes, done), 1)
        return context.get_dummy_value()
    return types.void(dst, src), codegen


@intrinsic
def _sfence(typingctx):
    """:func:`stream_fence`: ``llvm.x86.sse.sfence`` where
    :data:`SFENCE`, else nothing."""
    def codegen(context, builder, signature, args):
        if SFENCE:
            fence = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []),
                "llvm.x86.sse.sfence")
            builder.call(fence, [])
        return context.get_dummy_value()
    return types.void(), codegen


@overload(stream)
def _stream_impl(dst, src):
    if dst.dtype == src.dtype:
        return lambda dst, src: _stream_lines(dst, src)

    def convert(dst, src):
        for i in range(dst.size):
            store(dst, i, src[i])
    return convert


@overload(stream_fence)
def _stream_fence_impl():
    return lambda: _sfence()
