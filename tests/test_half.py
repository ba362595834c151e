"""Bit-exactness of the 16-bit float conversions the CPU kernels use.

Every float16 read and write in the kernels goes through
:func:`normkit.backend.storage.load` and :func:`~normkit.backend.storage.store`
(the CPU's F16C conversions where it has them), and through the integer bit
patterns of :mod:`normkit.backend.half` where it does not: both paths are
checked here against NumPy's ``astype``, and bfloat16 against ``ml_dtypes``.
"""

import numpy as np
import pytest
from numba import njit

from normkit.backend import half, storage

ALL_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
ALL_HALVES = ALL_HALF_BITS.view(np.float16)


@njit
def _load_all(bits, out):
    for i in range(bits.size):
        out[i] = storage.load(bits, i)


@njit
def _store_all(values, out):
    for i in range(values.size):
        storage.store(out, i, values[i])


@njit
def _widen_integer(bits, out):
    for i in range(bits.size):
        out[i] = half.half_to_single_bits(np.int64(bits[i]))


@njit
def _narrow_integer(bits, out):
    for i in range(bits.size):
        out[i] = half.single_to_half_bits(np.int64(bits[i]))


def _widen_kernels(x16):
    out = np.empty(x16.size, np.float32)
    _load_all(np.ascontiguousarray(x16).view(np.uint16).reshape(-1), out)
    return out.reshape(x16.shape)


def _narrow_kernels(x32):
    out = np.empty(x32.size, np.uint16)
    _store_all(np.ascontiguousarray(x32).reshape(-1), out)
    return out.view(np.float16).reshape(x32.shape)


def _widen_bits(x16):
    out = np.empty(x16.size, np.uint32)
    _widen_integer(np.ascontiguousarray(x16).view(np.uint16).reshape(-1), out)
    return out.view(np.float32).reshape(x16.shape)


def _narrow_bits(x32):
    out = np.empty(x32.size, np.uint16)
    _narrow_integer(np.ascontiguousarray(x32).view(np.uint32).reshape(-1), out)
    return out.view(np.float16).reshape(x32.shape)


@pytest.fixture(params=["kernels", "integer"])
def widen(request):
    """float16 -> float32 as the kernels read it, and by the integer path."""
    return _widen_kernels if request.param == "kernels" else _widen_bits


@pytest.fixture(params=["kernels", "integer"])
def narrow(request):
    """float32 -> float16 as the kernels write it, and by the integer path."""
    return _narrow_kernels if request.param == "kernels" else _narrow_bits


def assert_same_float16(got, x32):
    """``got`` has exactly the bits of ``x32.astype(float16)`` (NaN: any NaN)."""
    with np.errstate(over="ignore", invalid="ignore"):
        want = x32.astype(np.float16)
    assert got.dtype == np.float16
    assert got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    g, w = got.view(np.uint16)[~nan], want.view(np.uint16)[~nan]
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{bad.size} mismatches, e.g. x={x32[~nan][bad[:5]]!r} "
        f"got={g[bad[:5]]!r} want={w[bad[:5]]!r}")


def assert_same_float32(got, x16):
    """``got`` has exactly the bits of ``x16.astype(float32)`` (NaN: any NaN)."""
    want = x16.astype(np.float32)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan],
                                  want.view(np.uint32)[~nan])


def test_widen_all_float16_bit_patterns(widen):
    assert_same_float32(widen(ALL_HALVES), ALL_HALVES)


def test_widen_keeps_quiet_nan_payload(widen):
    # (F16C quiets a signalling NaN; its value stays NaN, checked above)
    nans = ALL_HALVES[np.isnan(ALL_HALVES)]
    quiet = nans[(nans.view(np.uint16) & 0x0200) != 0]
    np.testing.assert_array_equal(widen(quiet).view(np.uint32),
                                  quiet.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n", [0, 1, 7, 100_001])
def test_widen_sizes(n, widen):
    x = np.random.default_rng(n).choice(ALL_HALVES, size=n)
    assert_same_float32(widen(x), x)


def test_narrow_roundtrips_every_float16(narrow):
    x32 = ALL_HALVES.astype(np.float32)
    got = narrow(x32)
    assert_same_float16(got, x32)
    finite = ~np.isnan(ALL_HALVES)
    np.testing.assert_array_equal(got.view(np.uint16)[finite],
                                  ALL_HALF_BITS[finite])


def test_narrow_midpoints_and_neighbours(narrow):
    # consecutive finite non-negative float16 values (bit patterns 0..0x7bff,
    # plus 0x7c00 = inf so the last midpoint is the overflow threshold)
    lo = ALL_HALF_BITS[:0x7C00].view(np.float16).astype(np.float64)
    hi = ALL_HALF_BITS[1:0x7C01].view(np.float16).astype(np.float64)
    hi[-1] = 65536.0  # where the next value would be without overflow
    mid = ((lo + hi) / 2).astype(np.float32)  # exact in float32
    assert np.array_equal(mid.astype(np.float64), (lo + hi) / 2)
    pts = np.concatenate([mid,
                          np.nextafter(mid, np.float32(np.inf)),
                          np.nextafter(mid, np.float32(0))])
    pts = np.concatenate([pts, -pts])
    assert_same_float16(narrow(pts), pts)


def test_narrow_overflow_and_underflow_boundaries(narrow):
    f = np.float32
    specials = [65504, 65519.99, 65520, np.nextafter(f(65520), f(0)),
                65536, 1e5, 3.4e38, np.inf, 2.0 ** -14,
                np.nextafter(f(2.0 ** -14), f(0)), 2.0 ** -24, 2.0 ** -25,
                2.0 ** -25 * 1.0000001, np.nextafter(f(2.0 ** -25), f(1)),
                np.nextafter(f(2.0 ** -25), f(0)), 3 * 2.0 ** -25,
                2.0 ** -26, 1e-30, np.finfo(np.float32).tiny,
                np.finfo(np.float32).smallest_subnormal, 0.0]
    x = np.array(specials, dtype=np.float32)
    x = np.concatenate([x, -x, [np.nan, -np.nan]]).astype(np.float32)
    got = narrow(x)
    assert_same_float16(got, x)
    # explicit expectations, independent of NumPy
    def one(v):
        return narrow(np.array([v], dtype=np.float32))[0]
    assert one(65520) == np.inf and one(-65520) == -np.inf
    assert one(np.nextafter(f(65520), f(0))) == 65504
    assert one(2.0 ** -25) == 0                        # tie -> even (0)
    assert one(3 * 2.0 ** -25) == 2 * 2.0 ** -24       # tie -> even (2)
    assert one(2.0 ** -25 * 1.0000001) == 2.0 ** -24
    assert not np.signbit(one(0.0)) and np.signbit(one(-0.0))
    assert np.signbit(one(-1e-30)) and one(-1e-30) == 0
    assert np.isnan(got[-2:]).all()


def test_narrow_nan_is_quiet(narrow):
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF,
                     0x7FFFFFFF, 0x7F802000], dtype=np.uint32)
    got = narrow(bits.view(np.float32)).view(np.uint16)
    assert ((got & 0x7C00) == 0x7C00).all()
    assert ((got & 0x0200) != 0).all()  # quiet bit set
    np.testing.assert_array_equal(got >> 15, bits >> 31)


def test_narrow_random_bit_patterns(narrow):
    rng = np.random.default_rng(12345)
    bits = rng.integers(0, 1 << 32, size=10 ** 6, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)
    assert_same_float16(narrow(x), x)


def test_narrow_random_in_float16_range(narrow):
    # bit patterns concentrated where float16 is finite and subnormal
    rng = np.random.default_rng(7)
    bits = rng.integers(0x30000000, 0x47900000, size=300_000, dtype=np.uint32)
    sign = rng.integers(0, 2, size=bits.size, dtype=np.uint32) << 31
    x = (bits | sign).view(np.float32)
    assert_same_float16(narrow(x), x)


@pytest.mark.parametrize("n", [0, 1, 7, 100_001])
def test_narrow_sizes(n, narrow):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 300
    assert_same_float16(narrow(x), x)


# ---------------------------------------------------------------------------
# bfloat16 (ml_dtypes)
# ---------------------------------------------------------------------------

def test_bfloat16_load_every_bit_pattern():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = ALL_HALF_BITS.view(np.int16)
    out = np.empty(bits.size, np.float32)
    _load_all(bits, out)
    want = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan],
                                  want.view(np.uint32)[~nan])


def test_bfloat16_store_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 1 << 32, size=10 ** 6, dtype=np.uint64)
    x = np.concatenate([bits.astype(np.uint32).view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan,
                                  3.3895314e38, 3.4028235e38, 1e-45],
                                 np.float32)])
    out = np.empty(x.size, np.int16)
    _store_all(x, out)
    want = x.astype(ml_dtypes.bfloat16)
    nan = np.isnan(x)
    assert np.isnan(out.view(ml_dtypes.bfloat16)[nan].astype(np.float32)).all()
    np.testing.assert_array_equal(out[~nan], want.view(np.int16)[~nan])


def _float64_near_ties(rng, dtype):
    """float64 values at, just above and just below the midpoints between
    neighbouring ``dtype`` values (random ones, with their sign), plus
    values across the whole float64 range and the special ones."""
    grid = rng.standard_normal(20_000).astype(dtype).astype(np.float64)
    grid = grid[np.isfinite(grid) & (grid != 0)]
    ulp = np.abs(grid) * 2.0 ** -(np.finfo(dtype).nmant)
    mids = [grid + np.sign(grid) * ulp / 2 + d
            for d in (0.0, 2.0 ** -40, -(2.0 ** -40))]
    wide = rng.standard_normal(10_000) * 10.0 ** rng.integers(-50, 40, 10_000)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-50, -1e-50,
                        65519.99, 65520.0, 3.39e38, 1e39,
                        1 + 2.0 ** -11 + 2.0 ** -40])
    return np.concatenate(mids + [wide, special])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_store_rounds_a_float64_value_once(dtype, rng):
    """A float64 value is stored into 16 bits as NumPy's (and ml_dtypes')
    cast rounds it, once: not to float32 first, which turns a value just
    above or below a tie into the tie (``1 + 2**-11 + 2**-40`` into float16
    1.0 instead of ``1 + 2**-10``)."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    dtype = np.dtype(dtype)
    values = _float64_near_ties(rng, dtype)
    out = np.empty(values.size, dtype)
    _store_all(values, storage.storage_view(out))
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(dtype)
    nan = np.isnan(values)
    assert np.isnan(out[nan].astype(np.float32)).all()
    np.testing.assert_array_equal(out[~nan].view(np.uint16),
                                  want[~nan].view(np.uint16))


@njit
def _product_type_sum(a):
    total = storage.product_zero(a)
    for i in range(a.size):
        total += storage.load(a, i) * storage.load(a, i)
    return total


@pytest.mark.parametrize("dtype, want", [("float16", np.float32),
                                         ("bfloat16", np.float32),
                                         ("float32", np.float64),
                                         ("float64", np.float64)])
def test_product_zero_type(dtype, want):
    # The backward sums form their products in float32 only for 16-bit
    # storage; a float32 input's stay float64.  2048**2 + (1 + 2**-7)**2
    # (both exact in every storage) needs 36 bits: float32 rounds it.
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    values = np.array([2048.0, 1.0 + 2.0 ** -7])
    flat = storage.storage_view(values.astype(dtype))
    exact = values[0] ** 2 + values[1] ** 2
    assert _product_type_sum(flat) == want(want(values[0] ** 2)
                                           + want(values[1] ** 2))
    assert (_product_type_sum(flat) == exact) == (want is np.float64)
    assert type(storage.product_zero(flat)) is want
