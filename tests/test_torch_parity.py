"""Parity with torch.nn.functional (channels-first), forward and autograd."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import normkit  # noqa: E402
from normkit import reference as ref  # noqa: E402

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: 1e-4, np.float64: 1e-10}
DTYPES = [np.float32, np.float64]


def t(a, dtype, grad=False):
    out = torch.tensor(np.asarray(a, dtype=dtype), dtype=TORCH_DTYPE[dtype])
    return out.requires_grad_(grad)


def close(a, b, dtype, factor=1.0):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL[dtype] * factor * scale)


# Each entry: (normkit call, torch call, has running stats, mode keyword).
def nk_bn(x, rm, rv, w, b, train, **kw):
    return normkit.batch_norm(x, rm, rv, w, b, training=train, **kw)


def nk_in(x, rm, rv, w, b, train, **kw):
    return normkit.instance_norm(x, rm, rv, w, b, use_input_stats=train, **kw)


def th_bn(x, rm, rv, w, b, train):
    return F.batch_norm(x, rm, rv, w, b, training=train, momentum=0.1, eps=1e-5)


def th_in(x, rm, rv, w, b, train):
    return F.instance_norm(x, rm, rv, w, b, use_input_stats=train, momentum=0.1, eps=1e-5)


STATEFUL = {"batch_norm": (nk_bn, th_bn, "batch_norm"),
            "instance_norm": (nk_in, th_in, "instance_norm")}


@pytest.mark.parametrize("name", list(STATEFUL))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 3, 4, 2)], ids=str)
def test_running_stats_forward_and_backward(name, dtype, shape, rng):
    nk_fn, th_fn, nk_name = STATEFUL[name]
    c = shape[1]
    w, b = rng.uniform(0.5, 2.0, size=c), rng.normal(size=c)
    rm, rv = np.zeros(c), np.ones(c)
    trm, trv = t(rm, dtype), t(rv, dtype)
    for step in range(3):
        x = (rng.normal(1.0, 2.0, size=shape) * (step + 1)).astype(dtype)
        y = nk_fn(x, rm, rv, w, b, True)
        ty = th_fn(t(x, dtype), trm, trv, t(w, dtype), t(b, dtype), True)
        close(y, ty, dtype)
        close(rm, trm, dtype)
        close(rv, trv, dtype)
    # backward in training and in eval mode
    for train in (True, False):
        x = rng.normal(size=shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y, saved = nk_fn(x, rm.copy(), rv.copy(), w, b, train, return_saved=True)
        tx, tw, tb = t(x, dtype, True), t(w, dtype, True), t(b, dtype, True)
        ty = th_fn(tx, trm.clone(), trv.clone(), tw, tb, train)
        close(y, ty, dtype)
        ty.backward(t(dy, dtype))
        dx, dw, db = getattr(normkit, nk_name + "_backward")(dy, x, saved)
        close(dx, tx.grad, dtype)
        close(dw, tw.grad, dtype, 10)
        close(db, tb.grad, dtype, 10)


def check_affine_variant(rng, shape, dtype, w, b, forward, backward,
                         torch_forward):
    """Forward and backward of a batch-independent variant against torch's
    autograd, on random ``x`` and ``dy`` of ``shape``."""
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    y, saved = forward(x)
    tx = t(x, dtype, True)
    tw = t(w, dtype, True) if w is not None else None
    tb = t(b, dtype, True) if b is not None else None
    ty = torch_forward(tx, tw, tb)
    close(y, ty, dtype)
    ty.backward(t(dy, dtype))
    dx, dw, db = backward(dy, x, saved)
    close(dx, tx.grad, dtype)
    if w is not None:
        close(dw, tw.grad, dtype, 10)
        close(db, tb.grad, dtype, 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape", [((4, 6), (6,)), ((3, 4, 5), (4, 5)),
                                          ((2, 3, 4, 5), (5,))], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(dtype, shape, nshape, affine, rng):
    w = rng.uniform(0.5, 2, size=nshape) if affine else None
    b = rng.normal(size=nshape) if affine else None
    check_affine_variant(
        rng, shape, dtype, w, b,
        lambda x: normkit.layer_norm(x, nshape, w, b, return_saved=True),
        normkit.layer_norm_backward,
        lambda tx, tw, tb: F.layer_norm(tx, nshape, tw, tb, eps=1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [((3, 4, 5), 2), ((2, 6, 3, 2), 3),
                                          ((2, 4, 2, 2, 3), 1), ((3, 4), 2)], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(dtype, shape, groups, affine, rng):
    c = shape[1]
    w = rng.uniform(0.5, 2, size=c) if affine else None
    b = rng.normal(size=c) if affine else None
    check_affine_variant(
        rng, shape, dtype, w, b,
        lambda x: normkit.group_norm(x, groups, w, b, return_saved=True),
        normkit.group_norm_backward,
        lambda tx, tw, tb: F.group_norm(tx, groups, tw, tb, eps=1e-5))


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 3, 4, 2)], ids=str)
def test_reference_matches_torch(shape, rng):
    """The float64 reference itself agrees with torch (sanity of the oracle)."""
    c = shape[1]
    x = rng.normal(size=shape)
    w, b = rng.uniform(0.5, 2, size=c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    d = np.float64
    for train in (True, False):
        trm, trv = t(rm, d), t(rv, d)
        ty = F.batch_norm(t(x, d), trm, trv, t(w, d), t(b, d), train, 0.1, 1e-5)
        y, nrm, nrv = ref.batch_norm(x, rm, rv, w, b, training=train)
        close(y, ty, d)
        close(nrm, trm, d)
        close(nrv, trv, d)
        trm, trv = t(rm, d), t(rv, d)
        ty = F.instance_norm(t(x, d), trm, trv, t(w, d), t(b, d), train, 0.1, 1e-5)
        y, nrm, nrv = ref.instance_norm(x, rm, rv, w, b, use_input_stats=train)
        close(y, ty, d)
        close(nrm, trm, d)
        close(nrv, trv, d)
    close(ref.group_norm(x, 3, w, b), F.group_norm(t(x, d), 3, t(w, d), t(b, d)), d)
    close(ref.layer_norm(x, shape[1:]), F.layer_norm(t(x, d), shape[1:]), d)
