"""Streaming stores (:func:`normkit.backend.storage.stream`): the bytes of
an ordinary copy, whatever the size and the alignment, and nothing around
them."""

import numpy as np
import pytest
from numba import njit

from normkit.backend import storage


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
