"""normkit.torch modules against torch's own: forward, backward, buffers,
state_dict, layouts, dtypes, train/eval; gradcheck and opcheck of the custom
operators; zero-copy views; errors."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import normkit  # noqa: E402
import normkit.torch as nkt  # noqa: E402
from normkit.torch import _ops  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}

#: (torch module factory, input shape); normkit's comes from convert().
LAYERS = {
    "bn1d_2d": (lambda: nn.BatchNorm1d(3), (6, 3)),
    "bn1d_3d": (lambda: nn.BatchNorm1d(3), (4, 3, 5)),
    "bn2d": (lambda: nn.BatchNorm2d(3), (4, 3, 3, 3)),
    "bn2d_cumulative": (lambda: nn.BatchNorm2d(3, momentum=None), (4, 3, 2, 3)),
    "bn2d_untracked": (lambda: nn.BatchNorm2d(3, affine=False,
                                              track_running_stats=False),
                       (4, 3, 2, 2)),
    "bn2d_nobias": (lambda: nn.BatchNorm2d(3, bias=False), (4, 3, 2, 3)),
    "bn3d": (lambda: nn.BatchNorm3d(2), (3, 2, 2, 3, 2)),
    "in1d": (lambda: nn.InstanceNorm1d(3, affine=True,
                                       track_running_stats=True), (2, 3, 5)),
    "in1d_unbatched": (lambda: nn.InstanceNorm1d(3, affine=True,
                                                 track_running_stats=True),
                       (3, 5)),
    "in2d": (lambda: nn.InstanceNorm2d(3), (2, 3, 3, 4)),
    "in2d_unbatched": (lambda: nn.InstanceNorm2d(3, affine=True), (3, 3, 4)),
    "in3d_unbatched": (lambda: nn.InstanceNorm3d(2, affine=True,
                                                 track_running_stats=True),
                       (2, 2, 3, 2)),
    "in3d": (lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 2, 3, 2)),
    "in2d_nobias": (lambda: nn.InstanceNorm2d(3, affine=True, bias=False),
                    (2, 3, 3, 4)),
    "ln": (lambda: nn.LayerNorm((3, 4)), (2, 5, 3, 4)),
    "ln_nobias": (lambda: nn.LayerNorm(4, bias=False), (3, 4)),
    "gn": (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    "gn_nobias": (lambda: nn.GroupNorm(2, 4, bias=False), (2, 4, 3, 3)),
    "rms": (lambda: nn.RMSNorm(4), (3, 2, 4)),
    "rms_eps": (lambda: nn.RMSNorm((2, 4), eps=1e-3), (3, 2, 4)),
}


def _randomize(layer, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    layer.to(dtype)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=g, dtype=dtype)
                t.copy_(values + 0.5 if "var" in name or name == "weight"
                        else values - 0.5)
    return layer


def _pair(key, dtype, seed=0):
    make, shape = LAYERS[key]
    theirs = _randomize(make(), dtype, seed)
    ours = nkt.convert(copy.deepcopy(theirs))
    assert isinstance(ours, nkt.SchemeModule), type(ours)
    return theirs, ours, shape


def _run(layer, x, dy):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = layer(x)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad(y, [x] + params, dy)
    return y.detach(), grads


def _close(got, want, dtype, what):
    tol = TOL[dtype] * max(1.0, float(want.abs().max()))
    assert got.dtype == want.dtype, what
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", sorted(LAYERS))
def test_matches_torch_module(key, dtype):
    theirs, ours, shape = _pair(key, dtype)
    g = torch.Generator().manual_seed(1)
    layouts = [torch.contiguous_format]
    if len(shape) == 4:
        layouts.append(torch.channels_last)
    for mode in ("train", "train", "eval"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        for fmt in layouts:
            x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).to(
                memory_format=fmt)
            dy = torch.randn(shape, generator=g, dtype=dtype)
            want_y, want_g = _run(theirs, x, dy)
            got_y, got_g = _run(ours, x, dy)
            _close(got_y, want_y, dtype, f"{key} {mode} {fmt} y")
            if (fmt is torch.channels_last and key.startswith(("bn", "gn", "in"))
                        and "unbatched" not in key):  # (C, D, H, W): no batch
                assert got_y.is_contiguous(memory_format=torch.channels_last)
            for i, (a, b) in enumerate(zip(got_g, want_g)):
                _close(a, b, dtype, f"{key} {mode} {fmt} grad {i}")
            for (name, a), (_, b) in zip(ours.state_dict().items(),
                                         theirs.state_dict().items()):
                if a.is_floating_point():
                    _close(a, b, dtype, f"{key} {mode} {name}")
                else:
                    assert int(a) == int(b), name
    # state_dict loads both ways
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """float16 and bfloat16 input (float32 parameters): the output is in the
    input's dtype and matches torch on the float32 input."""
    theirs = _randomize(nn.BatchNorm2d(3), torch.float32, 2)
    ours = nkt.convert(copy.deepcopy(theirs))
    x = torch.randn(4, 3, 3, 3).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), theirs(x.float()), rtol=0, atol=2e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    y.float().sum().backward()


# --------------------------------------------------------------------------
# every scheme: gradcheck, opcheck
# --------------------------------------------------------------------------

class PositionNorm(normkit.Normalizer):
    """A plug-in: per-position normalization over the channels."""

    def view(self, shape):
        return normkit.View(P=shape[0], A=shape[1],
                            K=int(np.prod(shape[2:])), J=1, B=1)


SCHEMES = {
    "batch_norm": (lambda d: nkt.BatchNorm2d(3, dtype=d), (4, 3, 2, 2), 0, 1),
    "instance_norm": (lambda d: nkt.InstanceNorm1d(3, affine=True, dtype=d),
                      (2, 3, 4), 0, 1),
    "layer_norm": (lambda d: nkt.LayerNorm(4, dtype=d), (3, 4), 0, 1),
    "group_norm": (lambda d: nkt.GroupNorm(2, 4, dtype=d), (2, 4, 3), 0, 1),
    "rms_norm": (lambda d: nkt.RMSNorm(4, dtype=d), (3, 4), 0, 1),
    # sigma and the mean far outside the running statistics' reach: r and
    # d are clipped, so treating them as constants (the paper) is exact
    "batch_renorm": (lambda d: nkt.BatchRenorm(3, dtype=d), (6, 3), 50.0, 30),
    "ghost_batch_norm": (lambda d: nkt.GhostBatchNorm(3, 2, dtype=d),
                         (4, 3, 2), 0, 1),
    # one process (its collectives made all the same): tests/test_torch_sync.py
    # runs it on several
    "sync_batch_norm": (lambda d: nkt.SyncBatchNorm(
        3, dtype=d, communicator=normkit.distributed.CountingCommunicator()),
        (4, 3, 2), 0, 1),
    "plugin": (lambda d: nkt.SchemeModule(PositionNorm(), dtype=d),
               (2, 3, 4), 0, 1),
}


def _functional(layer, eager=False):
    """``layer``'s forward as a function of the input and the parameters
    (on copies of its buffers): through the operator, or, with ``eager``,
    the way modules call it in eager mode
    (:class:`normkit.torch._ops._Eager`)."""
    params = [getattr(layer, n) for n in layer._param_names]
    buffers = [getattr(layer, n) for n in layer._buffer_names]

    def f(x, *p):
        copies = [b.clone() for b in buffers]
        if eager:
            return _ops.forward(x, list(p), copies, layer, layer.training)
        return _ops.scheme_forward(x, list(p), copies, *layer._operator_key,
                                   layer.training)[0]
    return f, params, buffers


@pytest.mark.parametrize("path", ["operator", "eager"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gradcheck(name, training, path):
    make, shape, loc, scale = SCHEMES[name]
    layer = make(torch.float64).train(training)
    f, params, _ = _functional(layer, eager=path == "eager")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc
    params = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params))


@pytest.mark.parametrize("name, training", [("batch_norm", True),
                                            ("batch_renorm", True),
                                            ("sync_batch_norm", True),
                                            ("batch_norm", False)])
def test_opcheck(name, training):
    make, shape, loc, scale = SCHEMES[name]
    layer = make(torch.float64).train(training)
    _, params, buffers = _functional(layer)
    x = (torch.randn(shape, dtype=torch.float64) * scale + loc).requires_grad_()
    torch.library.opcheck(_ops.scheme_forward,
                          (x, params, [b.clone() for b in buffers],
                           *layer._operator_key, training))


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_eager_path_matches_the_operators(key, monkeypatch):
    """Modules in eager mode skip the operators' dispatch
    (:class:`normkit.torch._ops._Eager`) and get what the operators give,
    bit for bit: output, gradients and running statistics."""
    _, ours, shape = _pair(key, torch.float32)
    other = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    eager = _run(ours, x, dy)
    monkeypatch.setattr(_ops, "_route", lambda tensors: "operators")
    operator = _run(other, x, dy)
    for got, want in zip((eager[0], *eager[1]), (operator[0], *operator[1])):
        assert torch.equal(got, want)
    for (name, got), (_, want) in zip(ours.named_buffers(),
                                      other.named_buffers()):
        assert torch.equal(got, want), name


def test_dispatch_modes_and_transforms_see_the_operators():
    """Under a dispatch mode (as fake tensors, functionalization and
    debugging tools use) the modules run through the operators, which the
    mode sees; in plain eager mode through :class:`_ops._Eager`; no second
    derivative either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    bn = nkt.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    assert _ops._route([x, bn.weight]) == "eager"
    with Names() as mode:
        y = bn(x)
        y.sum().backward()
    assert any("normkit.scheme_forward" in n for n in mode.names)
    assert any("normkit.scheme_backward" in n for n in mode.names)
    y = bn(x)
    assert type(y.grad_fn).__name__ == "_EagerBackward"
    dx, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()
    assert _ops._route([torch.empty(2, device="meta")]) == "operators"


def test_inference_mode():
    """In inference mode the modules normalize and update their running
    statistics as torch's do; a module made in inference mode raises
    outside it with its running statistics unchanged."""
    ours, theirs = nkt.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x))
        made_inside = nkt.BatchNorm2d(3)
        made_inside(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    before = made_inside.running_mean.clone()
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        made_inside(x)
    assert torch.equal(made_inside.running_mean, before)


def test_registered_scheme_becomes_module():
    """A scheme from the registry is a torch module with no extra code."""
    gn = nkt.module("group_norm", num_groups=2, num_channels=4)
    ref = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(gn(x), ref(x))
    layer = nkt.module("batch_renorm", num_features=3)
    assert sorted(dict(layer.named_buffers())) == [
        "num_batches_tracked", "running_mean", "running_std"]
    layer(torch.randn(5, 3))
    assert int(layer.num_batches_tracked) == 1
    layer.rmax = 1.0
    assert layer.scheme.rmax == 1.0
    name = "torch_test_position_norm"
    if name not in normkit.available():
        normkit.register(name, PositionNorm)
    layer = nkt.module(name)
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 4), rtol=0,
                               atol=1e-6)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_reset_parameters_as_torch(key):
    """After a training step with other parameters, ``reset_parameters``
    leaves the same state as torch's (running statistics and parameters
    at their initial values)."""
    theirs, ours, shape = _pair(key, torch.float32)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for layer in (theirs, ours):
        layer.train()(x)
        layer.reset_parameters()
    want = theirs.state_dict()
    got = ours.state_dict()
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_reset_parameters_restores_a_scheme_s_own_initial_values():
    """Batch Renormalization's running standard deviation back to 1; a
    plug-in's parameter back to the value its scheme was built with."""
    layer = nkt.BatchRenorm(3)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    layer(torch.randn(6, 3))
    layer.reset_parameters()
    assert torch.equal(layer.running_std, torch.ones(3))
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.weight, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0
    scheme = PositionNorm((4,))
    scheme.weight = np.full(4, 0.25)
    layer = nkt.SchemeModule(scheme)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.full(layer.weight.shape, 0.25))


BIASLESS = {
    "BatchNorm2d": lambda: nkt.BatchNorm2d(3, bias=False),
    "InstanceNorm2d": lambda: nkt.InstanceNorm2d(3, affine=True, bias=False),
    "GroupNorm": lambda: nkt.GroupNorm(3, 3, bias=False),
    "SyncBatchNorm": lambda: nkt.SyncBatchNorm(3, bias=False),
    "BatchRenorm": lambda: nkt.BatchRenorm(3, bias=False),
    "GhostBatchNorm": lambda: nkt.GhostBatchNorm(3, 2, bias=False),
}


@pytest.mark.parametrize("name", list(BIASLESS))
def test_bias_false_leaves_a_weight_alone(name):
    """``bias=False`` (keyword, as in torch's layers and normkit's own):
    a weight and no bias, ``y`` the weight times the bias-free output, and
    a gradient for the weight alone."""
    layer = BIASLESS[name]()
    assert [p for p, _ in layer.named_parameters()] == ["weight"]
    assert layer.bias is None and "bias=False" in repr(layer)
    unit = copy.deepcopy(layer)        # weight 1
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    y = layer(x)
    y.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(
        y.detach(), unit(x).detach() * layer.weight.detach()[:, None, None])


def test_ghost_batch_norm_with_one_ghost_batch_is_batch_norm():
    ghost, bn = nkt.GhostBatchNorm(3, virtual_batch_size=6), nn.BatchNorm2d(3)
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(ghost(x), bn(x))
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    x = torch.randn(12, 3, 2, 2)        # two ghost batches
    y = ghost(x)
    torch.testing.assert_close(y[:6], nn.functional.batch_norm(
        x[:6], None, None, ghost.weight, ghost.bias, training=True))


# --------------------------------------------------------------------------
# zero copies
# --------------------------------------------------------------------------

class Recorder(normkit.Normalizer):
    """Records the address of the array its forward receives."""

    seen = []

    def view(self, shape):
        return normkit.View(1, shape[0], shape[1], 1,
                            int(np.prod(shape[2:])))

    def _forward(self, x):
        Recorder.seen.append((x.ctypes.data, x.shape))
        return super()._forward(x)


def test_contiguous_cpu_input_is_not_copied():
    layer = nkt.SchemeModule(Recorder())
    x = torch.randn(4, 3, 5)
    layer(x)
    assert Recorder.seen[-1] == (x.data_ptr(), (4, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_are_written_by_the_kernels(channels_last, dtype):
    """The forward's ``y`` and the backward's ``dx`` are tensors the
    operators allocate (in the input's memory format; on the CPU in
    NumPy's memory), handed to the scheme as ``out`` / ``dx_out`` and
    written there by the kernels; the input reaches the kernels as its
    own memory (float16 and, with ml_dtypes, bfloat16 too: no widened
    copy)."""
    if dtype is torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    bn = nkt.BatchNorm2d(3)
    seen = {}
    scheme_type = type(bn.scheme)
    forward, backward = scheme_type._forward, scheme_type._backward

    def spy_forward(self, x, out=None):
        seen["x"], seen["out"] = x.ctypes.data, out.ctypes.data
        return forward(self, x, out=out)

    def spy_backward(self, dy, x, saved, dx_out=None):
        seen["dx_out"] = dx_out.ctypes.data
        return backward(self, dy, x, saved, dx_out=dx_out)

    x = torch.randn(4, 3, 5, 6).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scheme_type, "_forward", spy_forward)
        mp.setattr(scheme_type, "_backward", spy_backward)
        y = bn(x)
        y.backward(torch.ones_like(y))
    assert seen["x"] == x.data_ptr()
    assert seen["out"] == y.data_ptr()
    assert seen["dx_out"] == x.grad.data_ptr()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and y.dtype == dtype
    reference = nn.BatchNorm2d(3)
    x2 = x.detach().float().requires_grad_(True)
    tolerance = {} if dtype is torch.float32 else {"rtol": 0, "atol": 2e-2}
    torch.testing.assert_close(y.float(), reference(x2), **tolerance)
    reference(x2).backward(torch.ones_like(x2))
    torch.testing.assert_close(x.grad.float(), x2.grad, **tolerance)


def test_unbatched_instance_norm_matches_torch():
    theirs = nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
    ours = nkt.InstanceNorm1d(3, affine=True, track_running_stats=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya)
    dy = torch.randn_like(x)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        ours(torch.randn(2, 3, 4, 5))


def test_channels_last_input_reaches_kernels_as_its_memory():
    """A channels_last tensor is handed over as the (N, H, W, C) view of
    its own memory (axis -1), not a copy."""
    bn = nkt.BatchNorm2d(3)
    seen = []
    forward = type(bn.scheme)._forward

    def spy(self, x):
        seen.append((x.ctypes.data, x.shape, self.axis))
        return forward(self, x)

    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(bn.scheme), "_forward", spy)
        y = bn(x)
    assert seen == [(x.data_ptr(), (2, 4, 5, 3), -1)]
    torch.testing.assert_close(y, nn.BatchNorm2d(3)(x))


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

def test_errors_match_torch():
    bn, ref = nkt.BatchNorm2d(3), nn.BatchNorm2d(3)
    bad_rank = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="expected 4D input"):
        ref(bad_rank)
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(bad_rank)
    ints = torch.ones(2, 3, 4, 4, dtype=torch.long)
    with pytest.raises(RuntimeError):
        ref(ints)
    with pytest.raises(RuntimeError, match="input must have a floating dtype"):
        bn(ints)
    with pytest.raises(TypeError):          # normkit's own type for dtypes
        bn(ints)
    meta = nkt.BatchNorm2d(3, device="meta")
    with pytest.raises(RuntimeError, match="parameter 'weight' is on meta"):
        meta(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bn(np.ones((2, 3, 4, 4)))


def test_documented_differences_from_torch():
    """README, "Where normkit differs": a BatchNorm call that raises is not
    counted; GroupNorm over ``N * C / G * spatial == 1`` values normalizes
    each one-value group to its bias where torch raises."""
    ours, theirs = nkt.BatchNorm2d(3), nn.BatchNorm2d(3)
    one_per_channel = torch.randn(1, 3, 1, 1)
    for layer in (ours, theirs):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(one_per_channel)
    assert int(ours.num_batches_tracked) == 0
    assert int(theirs.num_batches_tracked) == 1
    ours, theirs = nkt.GroupNorm(4, 4), nn.GroupNorm(4, 4)
    with torch.no_grad():
        ours.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(1, 4, requires_grad=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        theirs(x)
    y = ours(x)
    assert torch.equal(y, ours.bias.detach()[None])
    y.sum().backward()
    assert float(x.grad.abs().max()) < 1e-4        # zero up to rounding
    torch.testing.assert_close(ours(torch.ones(2, 4)),        # torch accepts
                               theirs(torch.ones(2, 4)) + ours.bias.detach())


_PER_SAMPLE = {
    "layer_norm": (lambda: nkt.LayerNorm(5), lambda: nn.LayerNorm(5),
                   (3, 5)),
    "group_norm": (lambda: nkt.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4),
                   (3, 4, 6)),
    "instance_norm": (lambda: nkt.InstanceNorm1d(4, affine=True),
                      lambda: nn.InstanceNorm1d(4, affine=True), (3, 4, 6)),
}


@pytest.mark.parametrize("variant", sorted(_PER_SAMPLE))
def test_torch_func_transforms_match_torch(variant):
    """``torch.func``'s ``grad``, ``jacrev``, ``vmap`` and per-sample
    gradients (``vmap(grad(...))``) of the modules give torch's layers'
    results (before, every transform refused the custom operators)."""
    from torch.func import functional_call, grad, jacrev, vmap
    make, make_torch, shape = _PER_SAMPLE[variant]
    layer, reference = make(), make_torch()
    x = torch.randn(shape)
    params = {name: p.detach() + 0.1 * torch.randn_like(p)
              for name, p in layer.named_parameters()}

    def both(transform):
        return [transform(lambda p, x: functional_call(m, p, (x,)))
                for m in (layer, reference)]

    def loss(f):
        return lambda p, x: f(p, x).square().sum()

    ours, theirs = both(lambda f: grad(loss(f), argnums=(0, 1))(params, x))
    torch.testing.assert_close(ours, theirs)
    ours, theirs = both(lambda f: jacrev(f, argnums=1)(params, x))
    torch.testing.assert_close(ours, theirs)
    ours, theirs = both(lambda f: vmap(
        grad(lambda p, xi: loss(f)(p, xi[None])), in_dims=(None, 0))(
            params, x))
    torch.testing.assert_close(ours, theirs)
    ours, theirs = both(lambda f: vmap(f, in_dims=(None, 0))(params,
                                                             x[:, None]))
    torch.testing.assert_close(ours, theirs)


def test_torch_func_and_running_statistics():
    """As for torch's BatchNorm: under ``grad`` the running statistics
    update when passed in and are refused as captured tensors (but read in
    eval mode); ``vmap`` maps them when they are mapped, leaves them in
    eval mode and refuses an update of unmapped ones (nothing written); no
    forward mode, no second derivative."""
    from torch.func import functional_call, grad, jacfwd, vmap
    layer, reference = nkt.BatchNorm1d(4), nn.BatchNorm1d(4)
    x = torch.randn(3, 4, 6)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def step(module, buffers, x):
        return functional_call(module, {**params, **buffers}, (x,))

    def buffers():
        return {name: b.clone() for name, b in layer.named_buffers()}

    mine, theirs = buffers(), buffers()
    torch.testing.assert_close(
        grad(lambda b, x: step(layer, b, x).square().sum(), argnums=1)(
            mine, x),
        grad(lambda b, x: step(reference, b, x).square().sum(), argnums=1)(
            theirs, x))
    torch.testing.assert_close(mine, theirs)
    assert int(mine["num_batches_tracked"]) == 1
    with pytest.raises(RuntimeError, match="mutate a captured"):
        grad(lambda x: layer(x).sum())(x)
    mapped = {name: torch.stack([b] * 3) for name, b in buffers().items()}
    theirs = {name: b.clone() for name, b in mapped.items()}
    torch.testing.assert_close(
        vmap(lambda b, xi: step(layer, b, xi[None]))(mapped, x),
        vmap(lambda b, xi: step(reference, b, xi[None]))(theirs, x))
    torch.testing.assert_close(mapped, theirs)
    before = buffers()
    with pytest.raises(RuntimeError, match="not mapped"):
        vmap(layer)(x[:, None])
    torch.testing.assert_close(buffers(), before)
    layer.eval()
    reference.load_state_dict(layer.state_dict())
    reference.eval()
    torch.testing.assert_close(vmap(layer)(x[:, None]),
                               vmap(reference)(x[:, None]))
    torch.testing.assert_close(grad(lambda x: layer(x).square().sum())(x),
                               grad(lambda x: reference(x).square().sum())(x))
    with pytest.raises(NotImplementedError, match="jvp"):
        jacfwd(layer)(x)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad(lambda x: grad(lambda x: layer(x).pow(3).sum())(x).sum())(x)


def test_import_normkit_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, normkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


def test_fold_batch_norm_weights_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.random(4) + 0.5
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    fw, fb = normkit.fold_batch_norm_weights(w, b, mean, var, gamma, beta, 1e-3)
    scale = gamma / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(fw, w * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(fb, (b - mean) * scale + beta, rtol=1e-6)
    assert fw.dtype == np.float32
    fw_last, _ = normkit.fold_batch_norm_weights(
        np.moveaxis(w, 0, -1), b, mean, var, gamma, beta, 1e-3, axis=-1)
    np.testing.assert_allclose(np.moveaxis(fw_last, -1, 0), fw)
    with pytest.raises(ValueError, match="running_var must have shape"):
        normkit.fold_batch_norm_weights(w, b, mean, var[:3])
