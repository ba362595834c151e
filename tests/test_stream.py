"""Streaming stores (:func:`normkit.backend.storage.stream`) and the map
that writes large outputs with them.

The narrow-groups map (channels-last BatchNorm and GroupNorm) streams its
rows out where the output has at least ``cpu.STREAM_BYTES``, and so does
the fused forward over rows of ``cpu.STREAM_SEGMENT_BYTES`` or more
(LayerNorm, RMSNorm), and so do the backward's affine sums over few wide
rows into gradients of that size: their values must be the bits the
ordinary stores write, whatever the alignment of the output, and the
passes that use them must still match the reference.
"""

import numpy as np
import pytest
from numba import njit

import normkit
from normkit import engine, reference
from normkit.backend import cpu, storage
from normkit.view import View, trailing_view


@njit
def _streamed(dst, src):
    storage.stream(dst, src)
    storage.stream_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16,
                                   np.int16, np.uint8])
def test_stream_copies_every_size_and_alignment(dtype, rng):
    for n in (0, 1, 3, 15, 16, 17, 63, 64, 65, 100, 1000, 4099):
        for offset in range(9):
            src = rng.integers(1, 100, n + offset).astype(dtype)[offset:]
            buffer = np.zeros(n + 20, dtype)
            dst = buffer[offset:offset + n]
            _streamed(dst, src)
            np.testing.assert_array_equal(dst, src)
            # the bytes around dst, in the lines it shares, are untouched
            assert not buffer[:offset].any() and not buffer[offset + n:].any()


def test_stream_into_another_dtype_converts_each_value():
    src = np.array([1.0, 2.5, -3.0, 65504.0], np.float32)
    dst = np.zeros(4, np.float16)
    _streamed(storage.storage_view(dst), src)
    np.testing.assert_array_equal(dst, src.astype(np.float16))


def test_stream_outside_kernels_is_a_copy():
    dst = np.zeros(5)
    storage.stream(dst, np.arange(5.0))
    storage.stream_fence()
    assert dst.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def _rows_for(dtype, at_least):
    """Rows of 64 values of ``dtype`` making at least ``at_least`` bytes."""
    return -(-at_least // (64 * np.dtype(dtype).itemsize))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 3])
def test_streamed_map_writes_the_bits_of_ordinary_stores(dtype, offset, rng):
    # one map over rows making 1.25 STREAM_BYTES (streamed), and the same
    # coefficients over each half of them (below it: ordinary stores); an
    # offset output is not aligned to a cache line
    rows = _rows_for(dtype, cpu.STREAM_BYTES * 5 // 4)
    rows += rows % 2
    x = rng.normal(3.0, 2.0, rows * 64).astype(dtype)
    mean = rng.normal(3.0, 1.0, 64)
    rstd = rng.uniform(0.5, 2.0, 64)
    gamma = rng.normal(1.0, 0.5, 64).astype(dtype)
    beta = rng.normal(0.0, 0.5, 64).astype(dtype)
    out = np.empty(rows * 64 + offset, dtype)[offset:]
    whole = engine.apply_affine(x, View(1, rows, 64, 1, 1), mean, rstd, gamma,
                                beta, out=out)
    assert whole.nbytes >= cpu.STREAM_BYTES
    half = rows // 2 * 64
    for part in (x[:half], x[half:]):
        assert part.nbytes < cpu.STREAM_BYTES
    parts = [engine.apply_affine(part, View(1, rows // 2, 64, 1, 1), mean,
                                 rstd, gamma, beta)
             for part in (x[:half], x[half:])]
    np.testing.assert_array_equal(whole, np.concatenate(parts))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["batch_norm", "group_norm"])
def test_large_channels_last_passes_match_the_reference(variant, dtype, rng):
    n = _rows_for(dtype, cpu.STREAM_BYTES + 1) // (32 * 32) + 1
    shape = (n, 32, 32, 64)
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    w = rng.normal(1.0, 0.3, 64).astype(dtype)
    b = rng.normal(0.0, 0.3, 64).astype(dtype)
    assert x.nbytes >= cpu.STREAM_BYTES
    if variant == "batch_norm":
        layer = normkit.BatchNorm2d(64, axis=-1)
        want = reference.batch_norm(x, None, None, w, b, training=True,
                                    axis=-1)[0]
        grads = reference.batch_norm_backward(dy, x, None, None, w, b,
                                              training=True, axis=-1)
    else:
        layer = normkit.GroupNorm(16, 64, axis=-1)
        want = reference.group_norm(x, 16, w, b, axis=-1)
        grads = reference.group_norm_backward(dy, x, 16, w, b, axis=-1)
    layer.weight[:] = w
    layer.bias[:] = b
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(layer(x), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.backward(dy), grads[0], rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("width", [256, 1000, 4099])
@pytest.mark.parametrize("affine", [True, False])
def test_streamed_forward_writes_the_bits_of_ordinary_stores(dtype, offset,
                                                             width, affine,
                                                             rng):
    # the fused forward over rows making 1.25 STREAM_BYTES (streamed), and
    # over each half of them (below it: ordinary stores): rows of a width
    # that is no multiple of a cache line, or of a streamed block, into an
    # output aligned or not, with and without weight and bias
    itemsize = np.dtype(dtype).itemsize
    if width * itemsize < cpu.STREAM_SEGMENT_BYTES:
        width *= 2
    rows = -(-cpu.STREAM_BYTES * 5 // 4 // (width * itemsize))
    rows += rows % 2
    x = rng.normal(3.0, 2.0, (rows, width)).astype(dtype)
    gamma = rng.normal(1.0, 0.5, width).astype(dtype) if affine else None
    beta = rng.normal(0.0, 0.5, width).astype(dtype) if affine else None
    out = np.empty(rows * width + offset, dtype)[offset:].reshape(rows, width)
    whole, mean, var, _ = engine.normalize_batch(
        x, trailing_view(x.shape, 1), gamma, beta, out=out)
    assert whole.nbytes >= cpu.STREAM_BYTES
    parts = [engine.normalize_batch(part, trailing_view(part.shape, 1), gamma,
                                    beta)
             for part in (x[:rows // 2], x[rows // 2:])]
    assert parts[0][0].nbytes < cpu.STREAM_BYTES
    np.testing.assert_array_equal(whole, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(mean, np.concatenate([p[1] for p in parts]))
    np.testing.assert_array_equal(var, np.concatenate([p[2] for p in parts]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_layer_norm_rows_match_the_reference(dtype, rng):
    width = 1000
    rows = -(-(cpu.STREAM_BYTES + 1) // (width * np.dtype(dtype).itemsize))
    x = rng.normal(2.0, 3.0, (rows, width)).astype(dtype)
    dy = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    w = rng.normal(1.0, 0.3, width).astype(dtype)
    b = rng.normal(0.0, 0.3, width).astype(dtype)
    layer = normkit.LayerNorm(width)
    layer.weight[:] = w
    layer.bias[:] = b
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(layer(x), reference.layer_norm(x, (width,), w, b),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(
        layer.backward(dy),
        reference.layer_norm_backward(dy, x, (width,), w, b)[0],
        rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 3])
def test_streamed_column_sums_write_the_bits_of_ordinary_stores(dtype, offset,
                                                                rng):
    # the backward's affine sums over few wide rows, written in place into
    # gradients of 1.25 STREAM_BYTES each (streamed), aligned or not, and
    # over each half of the columns with the same statistics (below it:
    # ordinary stores); three rows, so that one goes alone
    itemsize = np.dtype(dtype).itemsize
    width = cpu.STREAM_BYTES * 5 // 4 // itemsize
    x = rng.normal(3.0, 2.0, (3, width)).astype(dtype)
    dy = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    _, mean, _, rstd = engine.normalize_batch(x, trailing_view(x.shape, 1))

    def sums(columns):
        n = columns.stop - columns.start
        grads = tuple(np.empty(n + offset, dtype)[offset:] for _ in range(2))
        x_part, dy_part = x[:, columns], dy[:, columns]
        _, d_weight, d_bias = engine.backward(
            dy_part, x_part, trailing_view(x_part.shape, 1), mean, rstd,
            affine_out=grads)
        assert d_weight is grads[0] and d_bias is grads[1]
        return grads

    whole = sums(slice(0, width))
    assert whole[0].nbytes >= cpu.STREAM_BYTES
    halves = [sums(slice(0, width // 2)), sums(slice(width // 2, width))]
    assert halves[0][0].nbytes < cpu.STREAM_BYTES
    for k in range(2):
        np.testing.assert_array_equal(
            whole[k], np.concatenate([half[k] for half in halves]))
