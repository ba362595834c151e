"""Hard inputs (issue 16): empty batches, eps = 0, unbatched InstanceNorm,
num_features checks and torch 2.13's ``bias=`` argument, against PyTorch's
behaviour where it is installed and against what it does otherwise."""

import os
import warnings

import numpy as np
import pytest

import normkit
from normkit.backend.plan import Settings, grid_for, make_plan


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _data(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(dtype)


# --------------------------------------------------------------------------
# planning work without values
# --------------------------------------------------------------------------

ZERO_VIEWS = [normkit.View(*dims) for dims in
              [(0, 3, 4, 2, 5), (1, 0, 4, 1, 9), (2, 1, 0, 3, 1),
               (3, 1, 4, 0, 1), (1, 8, 3, 1, 0), (0, 0, 0, 0, 0)]]


@pytest.mark.parametrize("view", ZERO_VIEWS, ids=str)
def test_plans_and_grids_of_views_without_values_never_divide_by_zero(view):
    for threads in (1, 2, 16):
        plan = make_plan(view, threads)
        assert plan.n_chunks == 1 and plan.n_items == view.P
    grid = grid_for(view, Settings(threads=8, min_threads=4, target_blocks=4,
                                   values_per_thread=2))
    assert grid.n_chunks == 1 and grid.blocks(view.P) == view.P * view.K


@pytest.mark.parametrize("view", ZERO_VIEWS, ids=str)
def test_engine_on_views_without_values(view):
    x = np.empty(0, np.float32)
    mean, var = normkit.engine.moments(x, view)
    assert mean.shape == var.shape == (view.P, view.K)
    assert np.isnan(mean).all() and np.isnan(var).all()
    y, _, _, _ = normkit.engine.normalize_batch(x, view)
    assert y.shape == (0,) and y.dtype == np.float32
    dx, sum_dy, sum_dy_xhat = normkit.engine.backward(x, x, view, mean, mean)
    assert dx.shape == (0,)
    np.testing.assert_array_equal(sum_dy, np.zeros(view.K * view.J))
    np.testing.assert_array_equal(sum_dy_xhat, np.zeros(view.K * view.J))


# --------------------------------------------------------------------------
# empty batches
# --------------------------------------------------------------------------

EMPTY_CALLS = [
    ("layer_norm", (0, 5), lambda x, w, b: normkit.layer_norm(
        x, (5,), w, b, return_saved=True), "layer_norm"),
    ("group_norm", (0, 4, 3), lambda x, w, b: normkit.group_norm(
        x, 2, w, b, return_saved=True), "group_norm"),
    ("group_norm-no-spatial", (2, 4, 0), lambda x, w, b: normkit.group_norm(
        x, 2, w, b, return_saved=True), "group_norm"),
    ("instance_norm", (0, 4, 3), lambda x, w, b: normkit.instance_norm(
        x, weight=w, bias=b, return_saved=True), "instance_norm"),
    ("batch_norm", (0, 4, 9), lambda x, w, b: normkit.batch_norm(
        x, weight=w, bias=b, training=True, return_saved=True), "batch_norm"),
    ("batch_norm-no-spatial", (3, 4, 0), lambda x, w, b: normkit.batch_norm(
        x, weight=w, bias=b, training=True, return_saved=True), "batch_norm"),
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("label,shape,call,name", EMPTY_CALLS,
                         ids=[c[0] for c in EMPTY_CALLS])
def test_empty_input_gives_empty_output_and_zero_parameter_gradients(
        label, shape, call, name, dtype):
    x = np.zeros(shape, dtype)
    C = 5 if name == "layer_norm" else shape[1]
    w, b = np.ones(C), np.zeros(C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, saved = call(x, w, b)
        dx, dw, db = getattr(normkit, name + "_backward")(x, x, saved)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(dw, np.zeros(C))
    np.testing.assert_array_equal(db, np.zeros(C))


@pytest.mark.parametrize("label,shape,call,name", EMPTY_CALLS,
                         ids=[c[0] for c in EMPTY_CALLS])
def test_empty_input_like_torch(label, shape, call, name, torch):
    F = torch.nn.functional
    C = 5 if name == "layer_norm" else shape[1]
    xt = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    wt = torch.ones(C, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    if name == "instance_norm":   # torch raises IndexError with a weight
        wt = bt = None
    yt = {"layer_norm": lambda: F.layer_norm(xt, (5,), wt, bt),
          "group_norm": lambda: F.group_norm(xt, 2, wt, bt),
          "instance_norm": lambda: F.instance_norm(xt, weight=wt, bias=bt),
          "batch_norm": lambda: F.batch_norm(xt, None, None, wt, bt,
                                             training=True)}[name]()
    yt.sum().backward()
    x = np.zeros(shape)
    y, saved = call(x, np.ones(C), np.zeros(C))
    dx, dw, db = getattr(normkit, name + "_backward")(np.ones(shape), x, saved)
    assert y.shape == tuple(yt.shape) and dx.shape == tuple(xt.grad.shape)
    if name == "instance_norm":
        return
    np.testing.assert_array_equal(db, bt.grad.numpy())
    if label != "group_norm-no-spatial":   # torch: NaN there (README)
        np.testing.assert_array_equal(dw, wt.grad.numpy())


@pytest.mark.parametrize("shape", [(0, 5, 9), (3, 5, 0), (0, 5)], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_is_counted_and_leaves_running_statistics(shape, momentum):
    layer = normkit.BatchNorm1d(5, momentum=momentum)
    layer.running_mean[:] = 0.5
    y = layer(np.zeros(shape, np.float32))
    assert y.shape == shape
    np.testing.assert_array_equal(layer.running_mean, 0.5)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    assert layer.num_batches_tracked == 1            # as torch counts it
    rm, rv = np.zeros(5), np.ones(5)
    normkit.batch_norm(np.zeros(shape), rm, rv, training=True,
                       momentum=momentum, num_batches_tracked=0)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


@pytest.mark.parametrize("shape", [(0, 5, 9), (3, 5, 0)], ids=str)
def test_empty_batch_running_statistics_like_torch(shape, torch):
    ours, theirs = normkit.BatchNorm1d(5, momentum=None), torch.nn.BatchNorm1d(
        5, momentum=None)
    ours(np.zeros(shape, np.float32))
    theirs(torch.zeros(shape))
    np.testing.assert_array_equal(ours.running_mean, theirs.running_mean.numpy())
    np.testing.assert_array_equal(ours.running_var, theirs.running_var.numpy())
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("factory,shape", [
    (lambda: normkit.InstanceNorm(4, track_running_stats=True), (0, 4, 3)),
    (lambda: normkit.InstanceNorm1d(4, track_running_stats=True), (4, 0)),
    (lambda: normkit.GhostBatchNorm(4, 2), (0, 4, 3)),
    (lambda: normkit.BatchRenorm(4), (0, 4)),
    (lambda: normkit.LayerNorm(0), (3, 0)),
    (lambda: normkit.GroupNorm(1, 0), (2, 0, 3)),
    (lambda: normkit.RMSNorm((2, 3)), (0, 2, 3)),
], ids=["InstanceNorm", "InstanceNorm1d", "GhostBatchNorm", "BatchRenorm",
        "LayerNorm(0)", "GroupNorm(1, 0)", "RMSNorm"])
def test_every_layer_takes_an_empty_batch(factory, shape):
    layer = factory()
    before = {k: v for k, v in layer.state_dict().items() if v.ndim}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(np.zeros(shape))
        dx = layer.backward(np.zeros(shape))
    assert y.shape == dx.shape == shape
    for key, value in before.items():
        np.testing.assert_array_equal(getattr(layer, key), value, err_msg=key)
    for key, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, 0.0, err_msg=key)


def test_zero_size_weights_for_weight_and_spectral_norm():
    assert normkit.weight_norm(np.zeros((3, 0)), np.ones(3)).shape == (3, 0)
    w, saved = normkit.weight_norm(np.zeros((0, 3)), np.ones(0),
                                   return_saved=True)
    dv, dg = normkit.weight_norm_backward(w, np.zeros((0, 3)), saved)
    assert dv.shape == (0, 3) and dg.shape == (0,)
    y = normkit.spectral_norm(np.zeros((0, 3)), np.ones(0), np.ones(3))
    assert y.shape == (0, 3)


# --------------------------------------------------------------------------
# eps
# --------------------------------------------------------------------------

def test_batch_norm_refuses_eps_zero_with_batch_statistics_like_torch():
    message = "batch_norm eps must be positive during training, but got 0.0"
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=message):
        normkit.batch_norm(_data((4, 3)), rm, rv, training=True, eps=0.0)
    np.testing.assert_array_equal(rm, 0.0)
    with pytest.raises(ValueError, match=message):      # batch statistics
        normkit.batch_norm(_data((4, 3)), eps=0.0)
    y = normkit.batch_norm(_data((4, 3)), rm, rv, eps=0.0)   # inference
    np.testing.assert_allclose(y, _data((4, 3)))
    layer = normkit.BatchNorm1d(3, eps=0.0)             # constructed, as torch
    with pytest.raises(ValueError, match="BatchNorm1d eps must be positive"):
        layer(_data((4, 3)))
    assert layer.num_batches_tracked == 0
    layer.eval()(_data((4, 3)))
    with pytest.raises(ValueError, match="eps must be positive"):
        normkit.ghost_batch_norm(_data((4, 3)), 2, training=True, eps=0.0)


def test_batch_norm_eps_message_is_torchs(torch):
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(torch.ones(2, 3), None, None,
                                       training=True, eps=0.0)
    with pytest.raises(ValueError) as ours:
        normkit.batch_norm(np.ones((2, 3)), training=True, eps=0.0)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "instance_norm",
                                  "rms_norm", "batch_renorm"])
def test_zero_variance_with_eps_zero_gives_nan_never_an_error(name, dtype):
    x = np.ones((2, 4, 3), dtype)
    x[1] = np.arange(12).reshape(4, 3)                   # sample 1 varies
    call = {"layer_norm": lambda: normkit.layer_norm(
                x, (4, 3), eps=0.0, return_saved=True),
            "group_norm": lambda: normkit.group_norm(
                x, 2, eps=0.0, return_saved=True),
            "instance_norm": lambda: normkit.instance_norm(
                x, eps=0.0, return_saved=True),
            "rms_norm": lambda: normkit.rms_norm(
                x * 0, (4, 3), eps=0.0, return_saved=True),
            "batch_renorm": lambda: normkit.batch_renorm(
                x[:1], np.zeros(4), np.ones(4), training=True, eps=0.0,
                return_saved=True)}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, saved = call()
        grads = getattr(normkit, name + "_backward")(np.ones_like(y),
                                                     (x * 0 if name == "rms_norm"
                                                      else x[:1] if name ==
                                                      "batch_renorm" else x),
                                                     saved)
    assert np.isnan(y[0]).all()
    assert np.isnan(grads[0][0]).all()
    if name in ("layer_norm", "group_norm", "instance_norm"):
        assert np.isfinite(y[1]).all() and np.isfinite(grads[0][1]).all()


@pytest.mark.parametrize("name", ["layer_norm", "group_norm"])
def test_eps_zero_nan_like_torch(name, torch):
    F = torch.nn.functional
    x = np.ones((2, 3, 4))
    xt = torch.tensor(x, requires_grad=True)
    yt = (F.layer_norm(xt, (3, 4), eps=0.0) if name == "layer_norm"
          else F.group_norm(xt, 1, eps=0.0))
    yt.sum().backward()
    y, saved = (normkit.layer_norm(x, (3, 4), eps=0.0, return_saved=True)
                if name == "layer_norm" else
                normkit.group_norm(x, 1, eps=0.0, return_saved=True))
    dx = getattr(normkit, name + "_backward")(np.ones_like(x), x, saved)[0]
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt.detach().numpy()))
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(xt.grad.numpy()))


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "instance_norm",
                                  "rms_norm"])
def test_negative_or_non_finite_eps_is_refused(name, eps):
    args = {"layer_norm": ((3,),), "rms_norm": ((3,),), "group_norm": (1,),
            "instance_norm": ()}[name]
    with pytest.raises(ValueError, match="eps"):
        getattr(normkit, name)(_data((2, 4, 3)), *args, eps=eps)


# --------------------------------------------------------------------------
# unbatched InstanceNorm, num_features
# --------------------------------------------------------------------------

UNBATCHED = [("InstanceNorm1d", (3, 7)), ("InstanceNorm2d", (3, 4, 5)),
             ("InstanceNorm3d", (3, 2, 3, 4))]


@pytest.mark.parametrize("cls,shape", UNBATCHED, ids=[u[0] for u in UNBATCHED])
@pytest.mark.parametrize("affine", [False, True])
def test_unbatched_instance_norm_is_a_batch_of_one(cls, shape, affine):
    x = _data(shape)
    layer = getattr(normkit, cls)(3, affine=affine, track_running_stats=True)
    batched = getattr(normkit, cls)(3, affine=affine, track_running_stats=True)
    y = layer(x)
    np.testing.assert_allclose(y, batched(x[None])[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, batched.running_mean)
    dy = _data(shape, 1)
    np.testing.assert_allclose(layer.backward(dy), batched.backward(dy[None])[0],
                               rtol=0, atol=1e-12)
    for key in batched.grads:
        np.testing.assert_allclose(layer.grads[key], batched.grads[key])
    last = getattr(normkit, cls)(3, affine=affine, axis=-1)
    np.testing.assert_allclose(last(np.moveaxis(x, 0, -1)),
                               np.moveaxis(y, 0, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,shape", UNBATCHED, ids=[u[0] for u in UNBATCHED])
def test_unbatched_instance_norm_like_torch(cls, shape, torch):
    x = _data(shape)
    theirs = getattr(torch.nn, cls)(3, affine=True)
    ours = getattr(normkit, cls)(3, affine=True)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt.float()).double()
    dy = _data(shape, 1)
    (yt * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(ours(x), yt.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.backward(dy), xt.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.grads["weight"],
                               theirs.weight.grad.numpy(), atol=1e-4)


@pytest.mark.parametrize("cls,shape", [("InstanceNorm1d", (2, 3, 4, 5)),
                                       ("InstanceNorm2d", (3, 4)),
                                       ("InstanceNorm3d", (3, 4, 5))], ids=str)
def test_instance_norm_nd_rejects_other_dimensions(cls, shape):
    with pytest.raises(ValueError, match=r"\d-D"):
        getattr(normkit, cls)(3)(np.ones(shape))


def test_generic_instance_norm_says_how_to_pass_unbatched_input():
    with pytest.raises(ValueError, match=r"num_features=3 .*InstanceNorm1d/2d/3d"):
        normkit.InstanceNorm(3)(_data((3, 4, 5)))


@pytest.mark.parametrize("factory", [
    lambda: normkit.BatchNorm(3, affine=False, track_running_stats=False),
    lambda: normkit.BatchNorm1d(3), lambda: normkit.InstanceNorm(3),
    lambda: normkit.InstanceNorm1d(3), lambda: normkit.BatchRenorm(3),
    lambda: normkit.GhostBatchNorm(3, 2)], ids=range(6))
def test_num_features_mismatch_is_an_error_naming_it(factory):
    layer = factory()
    before = layer.state_dict()
    with pytest.raises(ValueError, match="num_features=3"):
        layer(_data((4, 5, 6)))
    for key, value in before.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)
    with pytest.raises(ValueError, match="num_channels=6"):
        normkit.GroupNorm(2, 6)(_data((4, 5, 6)))


# --------------------------------------------------------------------------
# bias=, InstanceNorm's running statistics
# --------------------------------------------------------------------------

BIAS_LAYERS = [("BatchNorm1d", (6, 3, 5)), ("BatchNorm2d", (4, 3, 2, 2)),
               ("BatchNorm3d", (2, 3, 2, 2, 2)), ("InstanceNorm1d", (2, 3, 5)),
               ("InstanceNorm2d", (2, 3, 2, 2)), ("InstanceNorm3d", (2, 3, 2, 2, 2)),
               ("GroupNorm", (2, 3, 5)), ("LayerNorm", (2, 3, 5))]


def _layer(module, cls, **kw):
    if cls == "GroupNorm":
        return getattr(module, cls)(3, 3, **kw)
    if cls == "LayerNorm":
        return getattr(module, cls)((3, 5), **kw)
    return getattr(module, cls)(3, affine=True, **kw)


@pytest.mark.parametrize("cls,shape", BIAS_LAYERS, ids=[b[0] for b in BIAS_LAYERS])
def test_bias_false_keeps_the_weight_only(cls, shape):
    layer = _layer(normkit, cls, bias=False)
    assert layer.bias is None and layer.weight is not None
    assert "bias" not in layer.state_dict() and "bias=False" in repr(layer)
    x = _data(shape)
    y = layer(x)
    layer.backward(np.ones_like(y))
    assert set(layer.grads) == {"weight"}
    np.testing.assert_allclose(y, _layer(normkit, cls)(x), atol=1e-12)


@pytest.mark.parametrize("cls,shape", BIAS_LAYERS, ids=[b[0] for b in BIAS_LAYERS])
def test_bias_false_like_torch(cls, shape, torch):
    theirs = _layer(torch.nn, cls, bias=False).double()
    ours = _layer(normkit, cls, bias=False)
    assert theirs.bias is None
    x = _data(shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    dy = _data(shape, 1)
    (yt * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(ours(x), yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(ours.backward(dy), xt.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(ours.grads["weight"], theirs.weight.grad.numpy(),
                               atol=1e-10)


def test_layer_norm_takes_bias_positionally_as_torch():
    layer = normkit.LayerNorm(4, 1e-5, True, False)
    assert layer.bias is None


def test_instance_norm_running_statistics_are_batch_norms(torch):
    """normkit's InstanceNorm counts batches and averages with
    momentum=None; torch's never counts and does not update with
    momentum=None (README, Semantics)."""
    x = _data((2, 3, 5))
    ours = normkit.InstanceNorm1d(3, momentum=None, track_running_stats=True)
    theirs = torch.nn.InstanceNorm1d(3, momentum=None, track_running_stats=True)
    ours(x), ours(x + 1.0)
    theirs(torch.tensor(x)), theirs(torch.tensor(x + 1.0))
    assert ours.num_batches_tracked == 2 and int(theirs.num_batches_tracked) == 0
    np.testing.assert_allclose(ours.running_mean, x.mean(axis=(0, 2)) + 0.5)
    np.testing.assert_array_equal(theirs.running_mean.numpy(), 0.0)


# --------------------------------------------------------------------------
# the CUDA backend (simulator where there is no GPU)
# --------------------------------------------------------------------------

def test_cuda_backend_takes_empty_inputs_and_eps_zero():
    cuda = pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off")
    layer = normkit.BatchNorm1d(5)
    x = cuda.to_device(np.zeros((0, 5, 3), np.float32))
    assert layer(x).shape == (0, 5, 3)
    assert layer.backward(x).shape == (0, 5, 3)
    np.testing.assert_array_equal(layer.running_mean.copy_to_host(), 0.0)
    np.testing.assert_array_equal(layer.grads["weight"].copy_to_host(), 0.0)
    assert layer.num_batches_tracked == 1
    y = normkit.layer_norm(cuda.to_device(np.zeros((0, 4), np.float16)), 4)
    assert y.shape == (0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the simulator's NumPy warnings
        y = normkit.group_norm(cuda.to_device(np.ones((1, 2, 3))), 1, eps=0.0)
    assert np.isnan(y.copy_to_host()).all()
