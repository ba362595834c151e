"""engine.backward_sums returns the group sums as two (P, K) arrays on
both backends (as documented), and engine.dx_from_sums takes that pair
back: together they give engine.backward's dx."""

import os

import numpy as np
import pytest

from normkit import View, engine
from normkit.backend import plan

VIEW = View(2, 2, 3, 2, 3)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, VIEW.dims)
    dy = rng.standard_normal(VIEW.dims)
    gscale = rng.uniform(0.5, 2.0, VIEW.K * VIEW.J)
    mean, var = engine.moments(x, VIEW)
    return dy, x, mean, 1.0 / np.sqrt(var + 1e-5), gscale


def expected_sums(dy, x, mean, rstd, gscale):
    xhat = (x - mean[:, None, :, None, None]) * rstd[:, None, :, None, None]
    g = dy * gscale.reshape(1, 1, VIEW.K, VIEW.J, 1)
    return ((g.sum(axis=(1, 3, 4)), (g * xhat).sum(axis=(1, 3, 4))),
            (dy.sum(axis=(0, 1, 4)).ravel(),
             (dy * xhat).sum(axis=(0, 1, 4)).ravel()))


def test_host_pair_of_group_sums_and_dx_from_them():
    dy, x, mean, rstd, gscale = inputs()
    group, affine = engine.backward_sums(dy, x, VIEW, mean, rstd, gscale)
    want_group, want_affine = expected_sums(dy, x, mean, rstd, gscale)
    assert len(group) == 2 and len(affine) == 2
    for got, want in zip(group + affine, want_group + want_affine):
        assert got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-12, atol=1e-10)
    dx = engine.dx_from_sums(dy, x, VIEW, mean, rstd, gscale, group,
                             VIEW.group_size)
    dx_fused, _, _ = engine.backward(dy, x, VIEW, mean, rstd, gscale)
    assert np.allclose(dx, dx_fused, rtol=1e-12, atol=1e-12)


cuda = pytest.importorskip("numba.cuda")


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"
                    and not cuda.is_available(), reason="no CUDA")
def test_device_sums_and_dx_match_the_host(monkeypatch):
    for key, value in dict(threads=8, min_threads=4, target_blocks=4,
                           values_per_thread=2).items():
        monkeypatch.setattr(plan.SETTINGS, key, value)
    dy, x, mean, rstd, gscale = inputs(1)
    host_group, host_affine = engine.backward_sums(dy, x, VIEW, mean, rstd,
                                                   gscale)
    host_dx = engine.dx_from_sums(dy, x, VIEW, mean, rstd, gscale,
                                  host_group, VIEW.group_size)
    d = [cuda.to_device(a) for a in (dy, x, mean, rstd, gscale)]
    group, affine = engine.backward_sums(*d[:2], VIEW, *d[2:])
    for got, want in zip(group + affine, host_group + host_affine):
        assert got.shape == want.shape
        assert np.allclose(got.copy_to_host(), want, rtol=1e-10, atol=1e-10)
    dx = engine.dx_from_sums(*d[:2], VIEW, *d[2:], group, VIEW.group_size)
    assert np.allclose(dx.copy_to_host(), host_dx, rtol=1e-10, atol=1e-10)
