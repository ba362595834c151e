"""Parallel float16 <-> float32 conversion on raw bit patterns.

Numba's CPU target has no float16 type: njit code can neither do float16
arithmetic nor even read a float16 array.  normkit therefore computes in
float32 and converts at the boundary.  NumPy's ``astype`` does that
conversion on a single thread, which on a few cores made float16 inputs an
order of magnitude slower than float32 ones.  This module does the same
conversions with parallel Numba kernels that never touch a float16 value:
the float16 data is viewed as ``uint16``, the float32 data as ``uint32``, and
the kernels translate one IEEE 754 bit pattern into the other with integer
operations only.

Bit layouts (IEEE 754)::

    binary16  s eeeee mmmmmmmmmm                bias 15,  10 fraction bits
    binary32  s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm bias 127, 23 fraction bits

An exponent field of all zeros means zero or subnormal (no implicit leading
one, exponent ``1 - bias``); all ones means infinity (fraction zero) or NaN.

* :func:`widen` (float16 -> float32) is exact: normal numbers re-bias the
  exponent (``+ 112``) and shift the fraction left by 13; a float16
  subnormal ``m * 2**-24`` is computed as the (exact, normal) float32
  product ``float32(m) * 2**-24`` whose bits are taken; infinities and NaNs
  keep their fraction (so NaN payloads survive).
* :func:`narrow` (float32 -> float16) rounds to nearest, ties to even, as
  ``astype(np.float16)`` does: normal results re-bias and round the
  fraction with integer adds; results below ``2**-14`` are rounded to the
  float16 subnormal grid (multiples of ``2**-24``) by one IEEE float32
  addition ``|x| + 0.5``; magnitudes ``>= 65520`` become infinity; NaNs
  become quiet NaNs that keep the top fraction bits; the sign of zero is
  preserved.

The only floating-point operations are these two, both exact or correctly
rounded in the default IEEE mode, and unaffected by flush-to-zero; the
kernels are compiled without fast-math.

Both kernels split the flat array into contiguous chunks of :data:`CHUNK`
elements distributed over threads with ``prange``; each chunk is processed
by a simple branch-free loop that LLVM vectorises.  Arrays of at most one
chunk are converted on the calling thread, which avoids the thread-pool
start-up cost for small inputs.
"""

import numpy as np
from numba import njit, prange

__all__ = ["CHUNK", "narrow", "widen"]

#: Elements per contiguous chunk handed to one ``prange`` iteration.
CHUNK = 1 << 16

_inline = njit(cache=True, nogil=True, inline="always")

# float32 constants used by the element kernels (exact powers of two)
_TWO_M24 = np.float32(2.0 ** -24)
_HALF = np.float32(0.5)


# ---------------------------------------------------------------------------
# element kernels (bit patterns held in int64)
# ---------------------------------------------------------------------------

@_inline
def _half_to_single_bits(h):
    """binary16 bit pattern ``h`` (0..0xffff) -> binary32 bit pattern."""
    sign = (h & 0x8000) << 16
    a = h & 0x7FFF
    e = a >> 10
    # normal: widen the fraction (<< 13), re-bias the exponent (127 - 15)
    normal = (a << 13) + (112 << 23)
    # infinity / NaN: all-ones exponent, fraction (NaN payload) kept
    special = (a << 13) | 0x7F800000
    # zero / subnormal: the value is m * 2**-24 with m = a < 1024; the
    # float32 product is exact (and normal unless zero), so its bits are the
    # answer.  Cheaper than normalising the fraction with integer ops.
    sub = np.int64(np.float32(np.float32(a) * _TWO_M24).view(np.uint32))
    r = normal if e != 0 else sub
    r = special if e == 0x1F else r
    return sign | r


@_inline
def _single_to_half_bits(u):
    """binary32 bit pattern ``u`` (0..0xffffffff) -> binary16 bit pattern."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # normal result (|x| >= 2**-14): re-bias by -112, drop 13 fraction bits,
    # round to nearest even (add 0xfff plus the kept LSB); a carry out of
    # the fraction correctly bumps the exponent
    r = a - 0x38000000
    normal = (r + 0xFFF + ((r >> 13) & 1)) >> 13
    # subnormal or zero result (|x| < 2**-14): |x| + 0.5 lies in [0.5, 1)
    # where the float32 spacing is 2**-24, the float16 subnormal step, so
    # the IEEE addition itself rounds |x| to that grid, ties to even; the
    # multiple of 2**-24 is then the difference of the bit patterns.  (With
    # denormals-are-zero a float32 subnormal input still correctly gives 0.)
    t = np.float32(np.uint32(a).view(np.float32) + _HALF)
    sub = np.int64(t.view(np.uint32)) - 0x3F000000
    res = normal if a >= 0x38800000 else sub
    # 65520 = (65504 + 65536) / 2 rounds (to even) up to infinity
    res = 0x7C00 if a >= 0x477FF000 else res
    # NaN: quiet it, keep the top 9 payload bits
    res = (0x7E00 | ((a >> 13) & 0x3FF)) if a > 0x7F800000 else res
    return sign | res


# ---------------------------------------------------------------------------
# array kernels
# ---------------------------------------------------------------------------

@_inline
def _convert_chunk(src, dst, to_half):
    """Convert the bit patterns of ``src`` into ``dst``, element by element."""
    if to_half:
        for j in range(src.shape[0]):
            dst[j] = _single_to_half_bits(np.int64(src[j]))
    else:
        for j in range(src.shape[0]):
            dst[j] = _half_to_single_bits(np.int64(src[j]))


@njit(cache=True, nogil=True, parallel=True)
def _convert_parallel(src, dst, to_half):
    n = src.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        start = c * CHUNK
        stop = min(start + CHUNK, n)
        _convert_chunk(src[start:stop], dst[start:stop], to_half)


@njit(cache=True, nogil=True)
def _convert_serial(src, dst, to_half):
    _convert_chunk(src, dst, to_half)


def _convert(src, dst, to_half):
    """Serial for at most one chunk (no thread-pool start), else parallel."""
    if src.shape[0] <= CHUNK:
        _convert_serial(src, dst, to_half)
    else:
        _convert_parallel(src, dst, to_half)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def widen(x16):
    """Convert a float16 array to float32, in parallel.

    Parameters
    ----------
    x16 : numpy.ndarray
        float16 array of any shape and memory layout.  A non-contiguous
        array is first copied into C order (one copy).

    Returns
    -------
    numpy.ndarray
        New C-contiguous float32 array of the same shape whose values are
        exactly those of ``x16.astype(np.float32)`` (the conversion is
        exact; signed zeros, subnormals, infinities and NaN payloads are
        kept).

    Raises
    ------
    TypeError
        If ``x16`` is not a float16 ndarray.

    Examples
    --------
    >>> import numpy as np
    >>> widen(np.array([1.0, -0.0, 6e-8], dtype=np.float16))
    array([ 1.0000000e+00, -0.0000000e+00,  5.9604645e-08], dtype=float32)
    """
    if not isinstance(x16, np.ndarray) or x16.dtype != np.float16:
        raise TypeError("widen: expected a float16 ndarray, got "
                        f"{type(x16).__name__} of dtype "
                        f"{getattr(x16, 'dtype', None)}")
    src = np.ascontiguousarray(x16).view(np.uint16).reshape(-1)
    out = np.empty(x16.shape, dtype=np.float32)
    dst = out.reshape(-1).view(np.uint32)
    _convert(src, dst, False)
    return out


def narrow(x32, out=None):
    """Convert a float32 array to float16, in parallel.

    Rounding is to nearest, ties to even, exactly as
    ``x32.astype(np.float16)``: magnitudes of 65520 and above become
    infinity, tiny values are rounded to the float16 subnormal grid (or to a
    signed zero), the sign of zero is kept and NaN becomes a quiet NaN.

    Parameters
    ----------
    x32 : numpy.ndarray
        float32 array, ideally C-contiguous; any other layout is first
        copied into C order.  Other dtypes are rejected rather than
        converted, because going through float32 would round twice.
    out : numpy.ndarray, optional
        C-contiguous float16 array of the same shape to write the result
        into.  A new array is allocated if omitted.

    Returns
    -------
    numpy.ndarray
        The float16 result (``out`` if given), same shape as ``x32``.

    Raises
    ------
    TypeError
        If ``x32`` is not a float32 ndarray, or ``out`` is not a float16
        ndarray.
    ValueError
        If ``out`` has the wrong shape or is not C-contiguous.

    Examples
    --------
    >>> import numpy as np
    >>> narrow(np.array([1.0, 65520.0, 2.0**-25], dtype=np.float32))
    array([ 1., inf,  0.], dtype=float16)
    """
    if not isinstance(x32, np.ndarray) or x32.dtype != np.float32:
        raise TypeError("narrow: expected a float32 ndarray, got "
                        f"{type(x32).__name__} of dtype "
                        f"{getattr(x32, 'dtype', None)}")
    if out is None:
        out = np.empty(x32.shape, dtype=np.float16)
    else:
        if not isinstance(out, np.ndarray) or out.dtype != np.float16:
            raise TypeError("narrow: out must be a float16 ndarray")
        if out.shape != x32.shape:
            raise ValueError(f"narrow: out has shape {out.shape}, "
                             f"expected {x32.shape}")
        if not out.flags.c_contiguous:
            raise ValueError("narrow: out must be C-contiguous")
    src = np.ascontiguousarray(x32).view(np.uint32).reshape(-1)
    dst = out.reshape(-1).view(np.uint16)
    _convert(src, dst, True)
    return out
