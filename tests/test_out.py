"""Output buffers (issue 17 item 2): ``out=`` on every forward, ``dx_out=``
on every backward, through the functional API, the layers and the scheme
layer down to the backend; results bit for bit those of the allocating
path, in place included, and bad buffers rejected before anything
changes."""

import numpy as np
import pytest

import normkit
from normkit import engine

DTYPES = (np.float32, np.float16, np.float64)

#: name -> (input shape, forward(x, **kw), backward or None); the
#: running statistics are made fresh for every call.
CASES = {
    "batch_norm-train": ((6, 4, 3, 5), lambda x, **kw: normkit.batch_norm(
        x, np.zeros(4), np.ones(4), np.full(4, 1.5), np.full(4, 0.25),
        training=True, **kw), normkit.batch_norm_backward),
    "batch_norm-eval": ((6, 4, 3, 5), lambda x, **kw: normkit.batch_norm(
        x, np.full(4, 0.5), np.full(4, 2.0), np.full(4, 1.5),
        np.full(4, 0.25), **kw), normkit.batch_norm_backward),
    "batch_norm-last": ((6, 3, 5, 4), lambda x, **kw: normkit.batch_norm(
        x, training=True, axis=-1, **kw), normkit.batch_norm_backward),
    "instance_norm": ((3, 4, 10), lambda x, **kw: normkit.instance_norm(
        x, np.zeros(4), np.ones(4), **kw), normkit.instance_norm_backward),
    "layer_norm-rows": ((12, 40), lambda x, **kw: normkit.layer_norm(
        x, 40, np.full(40, 2.0), np.full(40, 0.5), **kw),
        normkit.layer_norm_backward),
    "layer_norm-sample": ((3, 4, 6, 6), lambda x, **kw: normkit.layer_norm(
        x, (4, 6, 6), **kw), normkit.layer_norm_backward),
    "layer_norm-long": ((2, 40000), lambda x, **kw: normkit.layer_norm(
        x, 40000, **kw), normkit.layer_norm_backward),
    "group_norm": ((3, 6, 4, 4), lambda x, **kw: normkit.group_norm(
        x, 2, np.full(6, 2.0), np.full(6, 0.5), **kw),
        normkit.group_norm_backward),
    "rms_norm": ((5, 16), lambda x, **kw: normkit.rms_norm(
        x, 16, np.full(16, 2.0), **kw), normkit.rms_norm_backward),
    "batch_renorm-train": ((8, 4, 5), lambda x, **kw: normkit.batch_renorm(
        x, np.full(4, 0.1), np.full(4, 1.2), training=True, **kw),
        normkit.batch_renorm_backward),
    "batch_renorm-eval": ((8, 4, 5), lambda x, **kw: normkit.batch_renorm(
        x, np.full(4, 0.1), np.full(4, 1.2), **kw),
        normkit.batch_renorm_backward),
    "ghost_batch_norm": ((8, 4, 5), lambda x, **kw: normkit.ghost_batch_norm(
        x, 4, np.zeros(4), np.ones(4), training=True, **kw),
        normkit.ghost_batch_norm_backward),
    "weight_norm": ((4, 6), lambda x, **kw: normkit.weight_norm(
        x, np.full(4, 2.0), **kw), normkit.weight_norm_backward),
    "spectral_norm": ((4, 6), lambda x, **kw: normkit.spectral_norm(
        x, np.full(4, 0.5), np.full(6, 1 / 6 ** 0.5), training=False, **kw),
        normkit.spectral_norm_backward),
}


def make(shape, dtype, rng, mean=1.0):
    return rng.normal(mean, 2.0, shape).astype(dtype)


def assert_in_place_close(actual, expected):
    """In place, LLVM runs the scalar version of a loop it vectorizes for
    separate buffers (its runtime alias check fails), so contractions may
    round differently: the last bit or two, never more."""
    eps = np.finfo(expected.dtype).eps
    scale = float(np.max(np.abs(expected.astype(np.float64)), initial=1.0))
    np.testing.assert_allclose(actual, expected, rtol=8 * eps,
                               atol=8 * eps * scale)


def fortran_empty(x):
    """An output buffer in another layout than ``x``."""
    return np.empty(x.shape, x.dtype, order="F")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["c", "f"])
def test_forward_into_out_equals_the_allocating_path(name, dtype, layout, rng):
    shape, forward, _ = CASES[name]
    x = make(shape, dtype, rng)
    expected = forward(x)
    out = np.empty_like(x) if layout == "c" else fortran_empty(x)
    result = forward(x, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_forward_in_place_equals_the_allocating_path(name, dtype, rng):
    """``out=x``: every built-in pass reads what it needs of ``x`` before
    writing there (elementwise maps, statistics complete first)."""
    shape, forward, _ = CASES[name]
    x = make(shape, dtype, rng)
    expected = forward(x)
    inplace = x.copy()
    assert forward(inplace, out=inplace) is inplace
    assert_in_place_close(inplace, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("where", ["new", "f", "dy"])
def test_backward_into_dx_out_equals_the_allocating_path(name, dtype, where,
                                                         rng):
    shape, forward, backward = CASES[name]
    x = make(shape, dtype, rng)
    dy = make(shape, dtype, rng, mean=0.0)
    _, saved = forward(x, return_saved=True)
    expected = backward(dy, x, saved)
    expected = expected if isinstance(expected, np.ndarray) else expected[0]
    dx_out = {"new": np.empty_like, "f": fortran_empty,
              "dy": lambda a: a.copy()}[where](dy if where == "dy" else x)
    grad = dx_out if where == "dy" else dy
    result = backward(grad, x, saved, dx_out=dx_out)
    result = result if isinstance(result, np.ndarray) else result[0]
    assert result is dx_out
    if where == "dy":
        assert_in_place_close(dx_out, expected)
    else:
        np.testing.assert_array_equal(dx_out, expected)


def test_inference_batch_norm_in_place(rng):
    x = make((16, 8, 7, 7), np.float32, rng)
    rm, rv = rng.normal(size=8), rng.uniform(0.5, 2.0, 8)
    w, b = rng.normal(size=8), rng.normal(size=8)
    expected = normkit.batch_norm(x, rm, rv, w, b)
    address = x.ctypes.data
    y = normkit.batch_norm(x, rm, rv, w, b, out=x)
    assert y is x and x.ctypes.data == address
    assert_in_place_close(x, expected)


def test_layers_take_out_and_dx_out(rng):
    x = make((6, 3, 4, 4), np.float32, rng)
    dy = make(x.shape, np.float32, rng)
    reference, layer = normkit.BatchNorm2d(3), normkit.BatchNorm2d(3)
    expected = reference(x)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(layer.running_var, reference.running_var)
    dx_out = np.empty_like(x)
    assert layer.backward(dy, dx_out=dx_out) is dx_out
    np.testing.assert_array_equal(dx_out, reference.backward(dy))
    np.testing.assert_array_equal(layer.grads["weight"],
                                  reference.grads["weight"])


def test_unbatched_instance_norm_layer_writes_out(rng):
    x = make((3, 9), np.float64, rng)
    out = np.empty_like(x)
    assert normkit.InstanceNorm1d(3)(x, out=out) is out
    np.testing.assert_array_equal(out, normkit.InstanceNorm1d(3)(x))


def test_layer_forward_in_place_refuses_its_backward(rng):
    layer = normkit.BatchNorm2d(3).eval()
    x = make((4, 3, 2, 2), np.float32, rng)
    layer(x, out=x)
    with pytest.raises(RuntimeError, match="out=x"):
        layer.backward(np.ones_like(x))


def test_functional_in_place_with_return_saved_raises(rng):
    x = make((4, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3), np.ones(3)
    before = x.copy()
    with pytest.raises(ValueError, match="out is x itself"):
        normkit.batch_norm(x, rm, rv, training=True, out=x, return_saved=True)
    np.testing.assert_array_equal(x, before)
    assert not rm.any() and (rv == 1).all()


class RowNorm(normkit.Normalizer):
    """A plug-in with a ``_forward`` of its own that knows nothing of out."""

    def view(self, shape):
        return normkit.View(shape[0], 1, 1, shape[1], 1)

    def _forward(self, x):
        view = self.view(x.shape)
        y, saved = normkit.normalize(x, view, return_saved=True)
        return y * 2.0, saved


class ViewOnly(normkit.Normalizer):
    """A plug-in that only says its view: it gets ``out`` for free."""

    def view(self, shape):
        return normkit.View(shape[0], 1, 1, shape[1], 1)


@pytest.mark.parametrize("scheme", [RowNorm, ViewOnly])
def test_plugins_get_out(scheme, rng):
    x = make((5, 8), np.float64, rng)
    out = np.empty_like(x)
    assert scheme()(x, out=out) is out
    np.testing.assert_array_equal(out, scheme()(x))


def _bad_outs(x):
    ro = np.empty_like(x)
    ro.flags.writeable = False
    wide = np.empty((x.shape[0], 2 * x.shape[1]) + x.shape[2:], x.dtype)
    return {
        "shape": (np.empty(x.shape[::-1], x.dtype), ValueError, "shape"),
        "dtype": (np.empty(x.shape, np.float64), TypeError, "dtype float32"),
        "read-only": (ro, ValueError, "writeable"),
        "not an array": ([[0.0]], TypeError, "host NumPy array"),
        "partial overlap": (wide[:, 1:x.shape[1] + 1], ValueError,
                            "overlaps x partially"),
    }


@pytest.mark.parametrize("case", ["shape", "dtype", "read-only",
                                  "not an array", "partial overlap"])
def test_bad_out_raises_before_running_statistics_change(case, rng):
    x = make((6, 4, 5), np.float32, rng)
    if case == "partial overlap":
        wide = np.empty((6, 8, 5), np.float32)
        wide[:, :4] = x
        x = wide[:, :4]
        out = wide[:, 2:6]
        error, match = ValueError, "overlaps x partially"
    else:
        out, error, match = _bad_outs(x)[case]
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(error, match=match) as info:
        normkit.batch_norm(x, rm, rv, training=True, out=out)
    assert "batch_norm: out" in str(info.value)
    assert not rm.any() and (rv == 1).all()
    layer = normkit.BatchNorm1d(4)
    with pytest.raises(error, match=match):
        layer(x, out=out)
    assert layer.num_batches_tracked == 0 and not layer.running_mean.any()


def test_bad_dx_out_raises(rng):
    x = make((6, 4), np.float32, rng)
    _, saved = normkit.layer_norm(x, 4, return_saved=True)
    with pytest.raises(TypeError, match="dx_out must have x's dtype float32"):
        normkit.layer_norm_backward(x, x, saved, dx_out=np.empty(x.shape))
    with pytest.raises(ValueError, match="dx_out must have x's shape"):
        normkit.layer_norm_backward(x, x, saved, dx_out=np.empty((4, 6),
                                                                 np.float32))


def test_engine_passes_take_out(rng):
    x = make((4, 3, 5), np.float32, rng)
    view = engine.channel_view(x.shape, 1, False)
    mean, var = engine.moments(x, view)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    out = np.empty_like(x)
    assert engine.apply_affine(x, view, mean, rstd, out=out) is out
    np.testing.assert_array_equal(out, engine.apply_affine(x, view, mean, rstd))
    dy = make(x.shape, np.float32, rng)
    group, _ = engine.backward_sums(dy, x, view, mean, rstd)
    expected = engine.dx_from_sums(dy, x, view, mean, rstd, None, group,
                                   view.group_size)
    assert engine.dx_from_sums(dy, x, view, mean, rstd, None, group,
                               view.group_size, out=dy) is dy
    assert_in_place_close(dy, expected)
    with pytest.raises(TypeError, match="engine.apply_affine: out"):
        engine.apply_affine(x, view, mean, rstd, out=np.empty(x.shape))


def test_sync_batch_norm_takes_out_and_dx_out(rng):
    """The synchronized forward and its backward (one process: the same
    collectives, over one rank) write the caller's buffers."""
    from normkit import distributed
    x = make((6, 4, 5), np.float32, rng)
    dy = make(x.shape, np.float32, rng)
    reference = normkit.SyncBatchNorm(
        4, communicator=distributed.CountingCommunicator())
    layer = normkit.SyncBatchNorm(
        4, communicator=distributed.CountingCommunicator())
    expected = reference(x)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    dx_out = np.empty_like(x)
    assert layer.backward(dy, dx_out=dx_out) is dx_out
    np.testing.assert_array_equal(dx_out, reference.backward(dy))
    assert layer.communicator.count == reference.communicator.count == 2


def test_overlap_tells_apart_separate_same_and_partial_memory():
    """:func:`normkit.checks.overlap`, whose shortcut for separate host
    arrays must not hide a shared byte range or a changed layout."""
    from normkit.checks import overlap
    x = np.zeros((4, 6), np.float32)
    assert overlap(x, x) == "same"
    assert overlap(x, x[...]) == "same"          # another object, one layout
    assert overlap(x, x.copy()) == "none"
    assert overlap(x[:2], x[2:]) == "none"         # one buffer, apart
    assert overlap(x[:, 1:], x[:, :-1]) == "partial"
    assert overlap(x.T, x) == "partial"            # same bytes, another layout
    assert overlap(x[::2], x[1::2]) == "partial"   # interleaved ranges
    empty = x[:0]
    assert overlap(empty, empty) == "none"
