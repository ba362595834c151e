"""float16 <-> float32 on raw bit patterns, with integer operations.

Numba's CPU target has no float16 type.  On CPUs with F16C the kernels
convert with the hardware's instructions
(:mod:`normkit.backend.storage`); on others they use these two scalar
functions, which translate one IEEE 754 bit pattern into the other with
integer operations (and two exact float32 operations), so that every CPU
gives the same bits.

Bit layouts (IEEE 754)::

    binary16  s eeeee mmmmmmmmmm                bias 15,  10 fraction bits
    binary32  s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm bias 127, 23 fraction bits

An exponent field of all zeros means zero or subnormal (no implicit leading
one, exponent ``1 - bias``); all ones means infinity (fraction zero) or NaN.

* :func:`half_to_single_bits` is exact: normal numbers re-bias the
  exponent (``+ 112``) and shift the fraction left by 13; a float16
  subnormal ``m * 2**-24`` is computed as the (exact, normal) float32
  product ``float32(m) * 2**-24`` whose bits are taken; infinities and NaNs
  keep their fraction (so NaN payloads survive).
* :func:`single_to_half_bits` rounds to nearest, ties to even, as
  ``astype(np.float16)`` does: normal results re-bias and round the
  fraction with integer adds; results below ``2**-14`` are rounded to the
  float16 subnormal grid (multiples of ``2**-24``) by one IEEE float32
  addition ``|x| + 0.5``; magnitudes ``>= 65520`` become infinity; NaNs
  become quiet NaNs that keep the top fraction bits; the sign of zero is
  preserved.

Both are exact or correctly rounded in the default IEEE mode and unaffected
by flush-to-zero; they are compiled without fast-math.
"""

import numpy as np
from numba import njit

__all__ = ["half_to_single_bits", "single_to_half_bits"]

_inline = njit(cache=True, nogil=True, inline="always")

# float32 constants used by the element kernels (exact powers of two)
_TWO_M24 = np.float32(2.0 ** -24)
_HALF = np.float32(0.5)


# ---------------------------------------------------------------------------
# element kernels (bit patterns held in int64)
# ---------------------------------------------------------------------------

@_inline
def half_to_single_bits(h):
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
def single_to_half_bits(u):
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
