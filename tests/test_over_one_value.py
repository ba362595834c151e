"""channelwise.over reads an array of one value as a scalar, on the host
and on the device, and still rejects arrays that fit no kind."""

import os

import numpy as np
import pytest

import normkit
from normkit.backend import plan


@normkit.channelwise
def scaled_shift(x, a, b):
    return a * x + b


VIEW = normkit.View(2, 1, 3, 1, 4)      # (N, C, S) = (2, 3, 4)


def expected(x, a, b):
    return a * x + b


def test_one_value_arrays_are_scalars_on_the_host():
    x = np.arange(24.0).reshape(2, 3, 4)
    y = scaled_shift.over(VIEW, x, np.array([2.0]), np.array([[-1.0]]))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(y, expected(x, 2.0, -1.0))
    # an entry of a small array, taken as a one-value slice
    logits = np.array([0.5, 3.0, -2.0])
    assert np.array_equal(scaled_shift.over(VIEW, x, logits[1:2], 0.0),
                          3.0 * x)


def test_one_value_is_channel_and_group_where_those_fit():
    x = np.arange(8.0).reshape(2, 1, 4)
    view = normkit.View(2, 1, 1, 1, 4)           # one channel: K * J == 1
    y = scaled_shift.over(view, x, np.array([2.0]), 1.0)
    assert np.array_equal(y, 2.0 * x + 1.0)


def test_arrays_that_fit_no_kind_still_raise():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="nor is it one value"):
        scaled_shift.over(VIEW, x, np.ones(2), 0.0)


cuda = pytest.importorskip("numba.cuda")


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"
                    and not cuda.is_available(), reason="no CUDA")
def test_one_value_device_arrays_stay_on_the_device(monkeypatch):
    monkeypatch.setattr(plan.SETTINGS, "threads", 8)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    logits = np.array([0.5, 3.0, -2.0])
    d_logits = cuda.to_device(logits)
    y = scaled_shift.over(VIEW, cuda.to_device(x), d_logits[1:2],
                          d_logits[2:3])
    assert not isinstance(y, np.ndarray) and y.dtype == np.float32
    assert np.allclose(y.copy_to_host(), 3.0 * x - 2.0, atol=1e-6)
