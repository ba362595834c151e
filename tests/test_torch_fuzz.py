"""normkit.torch's modules against torch's own over random configurations.

``tests/test_torch_modules.py`` checks a fixed list of layers; this draws
them.  Each example converts a torch layer (:data:`KINDS`: BatchNorm1d/2d/
3d, InstanceNorm1d/2d/3d batched or not, LayerNorm, GroupNorm, RMSNorm)
with drawn sizes (ones included), flags (affine, bias,
``track_running_stats``, ``momentum`` None, 0 and 1 included, ``eps``) and
dtype (float64, float32, float16, bfloat16), then runs four steps (train,
train, eval, train), each on a new input in a drawn memory layout
(contiguous, channels-last, a strided view, a transposed copy).  Each step
compares the output, the gradients of the input and of the parameters and
the buffers with torch's layer run in float64 on the same values, the
truth: normkit's error must be within its dtype's tolerance or within
twice the error of torch's layer in that dtype.  Where one library raises
the other must too, but for the one documented difference (GroupNorm over
``N * C / G * spatial == 1`` values, see :func:`torch_refuses`), and
normkit's buffers must be as they were.  The
examples are derandomized and their number fixed, so CI runs the same
ones everywhere.
"""

import copy
import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn

import normkit.torch as nkt  # noqa: E402

#: Examples per kind of layer; set NORMKIT_FUZZ_EXAMPLES for a longer run,
#: as for ``tests/test_fuzz.py``.
EXAMPLES = int(os.environ.get("NORMKIT_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: Error bound relative to max(1, max |truth|) per dtype.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2,
       torch.bfloat16: 5e-2}
#: Steps of each example, in order.
MODES = ("train", "train", "eval", "train")
LAYOUTS = ("contiguous", "channels last", "strided", "transposed")


@st.composite
def batch_norm(draw, n, c, spatial):
    layer = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d,
             nn.BatchNorm3d)[len(spatial)]
    if n * math.prod(spatial) == 1 and not draw(st.booleans()):
        n = 2  # one value per channel, which training refuses, now and then
    return layer(c, eps=draw(st.sampled_from([1e-5, 1e-3])),
                 momentum=draw(st.sampled_from([0.1, None, 0.0, 1.0])),
                 affine=draw(st.booleans()), bias=draw(st.booleans()),
                 track_running_stats=draw(st.booleans())), (n, c, *spatial)


@st.composite
def instance_norm(draw, n, c, spatial):
    spatial = spatial or (draw(st.integers(1, 4)),)
    if math.prod(spatial) == 1 and not draw(st.booleans()):
        spatial = (*spatial[:-1], 2)  # one value per instance now and then
    layer = (None, nn.InstanceNorm1d, nn.InstanceNorm2d,
             nn.InstanceNorm3d)[len(spatial)]
    batched = draw(st.booleans())
    return layer(c, momentum=draw(st.sampled_from([0.1, None])),
                 affine=draw(st.booleans()), bias=draw(st.booleans()),
                 track_running_stats=draw(st.booleans())), (
        (n, c, *spatial) if batched else (c, *spatial))


def _trailing(draw, shape):
    """The trailing axes of ``shape`` that a row normalization takes."""
    ndim = draw(st.integers(1, max(1, len(shape) - 1)))
    return shape[len(shape) - ndim:]


@st.composite
def layer_norm(draw, n, c, spatial):
    shape = (n, c, *spatial)
    return nn.LayerNorm(_trailing(draw, shape),
                        elementwise_affine=draw(st.booleans()),
                        bias=draw(st.booleans())), shape


@st.composite
def group_norm(draw, n, c, spatial):
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    return nn.GroupNorm(groups, c, affine=draw(st.booleans()),
                        bias=draw(st.booleans())), (n, c, *spatial)


@st.composite
def rms_norm(draw, n, c, spatial):
    shape = (n, c, *spatial)
    return nn.RMSNorm(_trailing(draw, shape),
                      eps=draw(st.sampled_from([None, 1e-5, 1e-3])),
                      elementwise_affine=draw(st.booleans())), shape


#: Strategies of ``(torch layer, input shape)`` given ``n``, ``c`` and the
#: spatial sizes, one per kind of layer.
KINDS = {"batch": batch_norm, "instance": instance_norm, "layer": layer_norm,
         "group": group_norm, "rms": rms_norm}


def torch_refuses(layer, shape):
    """True where torch's ``F.group_norm`` raises "Expected more than 1
    value per channel" and normkit normalizes (README, "Where normkit
    differs"): ``N * C / G * spatial == 1``.  Its groups hold one value
    each, which normkit maps to the bias."""
    return (isinstance(layer, nn.GroupNorm)
            and shape[0] * shape[1] // layer.num_groups
            * math.prod(shape[2:]) == 1)


def randomized(layer, generator):
    """``layer`` in float32 with parameters and buffers drawn near those of
    a trained layer (variances and weights in [0.5, 1.5))."""
    layer.float()
    with torch.no_grad():
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=generator)
                t.copy_(values + 0.5 if "var" in name or name == "weight"
                        else values - 0.5)
    return layer


def in_layout(x, layout):
    """``x`` (values unchanged) in memory laid out as ``layout`` says."""
    if layout == "channels last" and x.ndim in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.ndim == 4
                            else torch.channels_last_3d)
    if layout == "strided" and x.ndim >= 2:
        wider = torch.zeros((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        wider[::2] = x
        return wider[::2]
    if layout == "transposed" and x.ndim >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def step(layer, x, dy):
    """``(y, grads)``: the forward of ``layer`` on ``x`` and the gradients
    of ``sum(y * dy)`` for ``x`` and the layer's parameters."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    return y.detach(), grads


def error(got, truth):
    """Largest absolute difference of ``got`` from float64 ``truth``."""
    return float((got.double() - truth).abs().max()) if got.numel() else 0.0


def assert_as_close(ours, theirs, truth, dtype, what):
    """``ours`` within its tolerance of ``truth``, or no further from it
    than twice ``theirs`` (torch in the same dtype)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    assert torch.equal(ours.isnan(), truth.isnan()), f"{what}: NaN pattern"
    finite = ~truth.isnan()
    ours, theirs, truth = ours[finite], theirs[finite], truth[finite]
    bound = TOL[dtype] * max(1.0, float(truth.abs().max()) if truth.numel()
                             else 1.0)
    err = error(ours, truth)
    assert err <= max(bound, 2 * error(theirs, truth)), (
        f"{what}: error {err:.3g} against float64, torch's "
        f"{error(theirs, truth):.3g}, bound {bound:.3g}")


@pytest.mark.parametrize("kind", list(KINDS))
@SETTINGS
@given(data=st.data(), n=st.integers(1, 4),
       c=st.sampled_from([1, 2, 3, 4, 6, 8]),
       spatial=st.lists(st.integers(1, 4), max_size=3).map(tuple),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_converted_layer_matches_torch(kind, data, n, c, spatial, dtype, seed):
    theirs, shape = data.draw(KINDS[kind](n, c, spatial), label="layer")
    generator = torch.Generator().manual_seed(seed)
    randomized(theirs, generator).to(dtype)
    ours = nkt.convert(copy.deepcopy(theirs))
    truth = copy.deepcopy(theirs).double()
    if isinstance(theirs, nn.RMSNorm) and theirs.eps is None:
        truth.eps = torch.finfo(dtype).eps  # what eps=None means in dtype
    for number, mode in enumerate(MODES):
        layout = data.draw(st.sampled_from(LAYOUTS), label=f"layout {number}")
        what = f"step {number} ({mode}, {layout})"
        for layer in (ours, theirs, truth):
            layer.train(mode == "train")
        x = (3.0 + 2.0 * torch.randn(shape, generator=generator,
                                     dtype=torch.float64)).to(dtype)
        dy = torch.randn(shape, generator=generator,
                         dtype=torch.float64).to(dtype)
        x = in_layout(x, layout)
        before = {name: value.clone() for name, value in ours.named_buffers()}
        try:
            y, grads = step(ours, x, dy)
        except (TypeError, ValueError) as raised:
            with pytest.raises(Exception):
                step(theirs, x, dy)
            assert str(raised)
            # nothing changed (torch's BatchNorm*d counts the failed call in
            # num_batches_tracked, so the example ends here)
            for name, value in ours.named_buffers():
                assert torch.equal(value, before[name]), f"{what}: {name}"
            event("both raise")
            return
        if torch_refuses(theirs, x.shape):
            with pytest.raises(ValueError, match="more than 1 value"):
                step(theirs, x, dy)
            bias = ours.bias if ours.bias is not None else torch.zeros(c)
            per_channel = bias.detach().to(dtype).reshape(c, *[1] * (y.ndim - 2))
            assert torch.equal(y, per_channel.expand_as(y)), what
            event("torch refuses a GroupNorm")
            continue
        event(f"compared: {dtype}, {layout}")
        y_theirs, grads_theirs = step(theirs, x, dy)
        y_truth, grads_truth = step(truth, x.double(), dy.double())
        assert y.dtype == dtype and y.shape == x.shape, what
        assert_as_close(y, y_theirs, y_truth, dtype, f"{what}: y")
        for index, values in enumerate(zip(grads, grads_theirs, grads_truth)):
            assert_as_close(*values, dtype, f"{what}: gradient {index}")
        buffers = dict(ours.named_buffers())
        truth_buffers = dict(truth.named_buffers())
        for name, value in theirs.named_buffers():
            if value.is_floating_point():
                assert_as_close(buffers[name], value, truth_buffers[name],
                                dtype, f"{what}: {name}")
            else:
                assert torch.equal(buffers[name], value), f"{what}: {name}"
