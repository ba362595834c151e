"""Bit-exactness of normkit.backend.half (float16 <-> float32) against NumPy."""

import numpy as np
import pytest

from normkit.backend.half import CHUNK, narrow, widen

ALL_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
ALL_HALVES = ALL_HALF_BITS.view(np.float16)


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
    assert got.flags.c_contiguous
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan],
                                  want.view(np.uint32)[~nan])


# ---------------------------------------------------------------------------
# widen
# ---------------------------------------------------------------------------

def test_widen_all_float16_bit_patterns():
    assert_same_float32(widen(ALL_HALVES), ALL_HALVES)


def test_widen_keeps_nan_payload():
    nans = ALL_HALVES[np.isnan(ALL_HALVES)]
    np.testing.assert_array_equal(widen(nans).view(np.uint32),
                                  nans.astype(np.float32).view(np.uint32))


def test_widen_all_patterns_parallel_path():
    # many chunks, so the prange kernel runs; unaligned tail chunk
    x = np.tile(ALL_HALVES, 5)[:5 * 65536 - 3]
    assert x.size > CHUNK
    assert_same_float32(widen(x), x)


@pytest.mark.parametrize("n", [0, 1, 7, 100_001])
def test_widen_sizes(n):
    x = np.random.default_rng(n).choice(ALL_HALVES, size=n)
    assert_same_float32(widen(x), x)


def test_widen_noncontiguous_3d():
    base = np.random.default_rng(3).choice(ALL_HALVES, size=(40, 50, 60))
    x = base.transpose(2, 0, 1)[::2, 1:, ::-3]
    assert not x.flags.c_contiguous
    out = widen(x)
    assert_same_float32(out, x)
    assert out.shape == x.shape


def test_widen_zero_d():
    x = np.array(-2.5, dtype=np.float16)
    out = widen(x)
    assert out.shape == () and out.dtype == np.float32 and out == -2.5


def test_widen_rejects_other_dtypes():
    with pytest.raises(TypeError):
        widen(np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError):
        widen([1.0, 2.0])


# ---------------------------------------------------------------------------
# narrow
# ---------------------------------------------------------------------------

def test_narrow_roundtrips_every_float16():
    x32 = ALL_HALVES.astype(np.float32)
    got = narrow(x32)
    assert_same_float16(got, x32)
    finite = ~np.isnan(ALL_HALVES)
    np.testing.assert_array_equal(got.view(np.uint16)[finite],
                                  ALL_HALF_BITS[finite])


def test_narrow_midpoints_and_neighbours():
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


def test_narrow_overflow_and_underflow_boundaries():
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


def test_narrow_nan_is_quiet():
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF,
                     0x7FFFFFFF, 0x7F802000], dtype=np.uint32)
    got = narrow(bits.view(np.float32)).view(np.uint16)
    assert ((got & 0x7C00) == 0x7C00).all()
    assert ((got & 0x0200) != 0).all()  # quiet bit set
    np.testing.assert_array_equal(got >> 15, bits >> 31)


def test_narrow_random_bit_patterns():
    rng = np.random.default_rng(12345)
    bits = rng.integers(0, 1 << 32, size=10 ** 6, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)
    assert_same_float16(narrow(x), x)


def test_narrow_random_in_float16_range():
    # bit patterns concentrated where float16 is finite and subnormal
    rng = np.random.default_rng(7)
    bits = rng.integers(0x30000000, 0x47900000, size=300_000, dtype=np.uint32)
    sign = rng.integers(0, 2, size=bits.size, dtype=np.uint32) << 31
    x = (bits | sign).view(np.float32)
    assert_same_float16(narrow(x), x)


@pytest.mark.parametrize("n", [0, 1, 7, 100_001])
def test_narrow_sizes(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 300
    assert_same_float16(narrow(x), x)


def test_narrow_out_and_layouts():
    x = np.random.default_rng(5).standard_normal((20, 30, 40), np.float32)
    out = np.empty(x.shape, np.float16)
    assert narrow(x, out=out) is out
    assert_same_float16(out, x)
    xt = x.transpose(1, 2, 0)  # non-contiguous input is copied first
    assert_same_float16(narrow(xt), xt)
    z = narrow(np.array(1.5, dtype=np.float32))
    assert z.shape == () and z == 1.5


def test_narrow_rejects_bad_arguments():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError):
        narrow(x.astype(np.float64))
    with pytest.raises(TypeError):
        narrow(x, out=np.empty((2, 3), np.float32))
    with pytest.raises(ValueError):
        narrow(x, out=np.empty((3, 2), np.float16))
    with pytest.raises(ValueError):
        narrow(x, out=np.empty((3, 2), np.float16).T)
