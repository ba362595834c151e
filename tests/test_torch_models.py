"""normkit.torch in a real model: ResNet-18 (torchvision's architecture)
converted, trained, compiled, folded and frozen."""

import copy
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import normkit

torch = pytest.importorskip("torch")
nn = torch.nn

import normkit.torch as nkt  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_torch_modules import PositionNorm  # noqa: E402
from torch_models import ResNet18  # noqa: E402

N_NORMS = 20   # BatchNorm2d layers of ResNet-18


def _model(seed=0):
    torch.manual_seed(seed)
    model = ResNet18(num_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():      # statistics and affine away from the defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape,
                                                generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape,
                                               generator=g) + 0.5)
    return model


def _batch(seed=0, n=4, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _norms(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def test_convert_resnet18_matches_in_eval_and_train():
    theirs = _model()
    ours = nkt.convert(copy.deepcopy(theirs))
    assert len(_norms(ours, nkt.BatchNorm2d)) == N_NORMS
    assert not _norms(ours, nn.BatchNorm2d)
    x, _ = _batch()
    for mode in (False, True):
        theirs.train(mode)
        ours.train(mode)
        with torch.no_grad():
            want, got = theirs(x), ours(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(_norms(ours, nkt.BatchNorm2d), _norms(theirs, nn.BatchNorm2d)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5,
                                   atol=1e-6)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


def _train(model, steps, x, labels, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype, steps, tol", [(torch.float32, 1, 1e-4),
                                               (torch.float64, 3, 1e-9)])
def test_sgd_steps_match(dtype, steps, tol):
    """Same losses and parameters after SGD steps: three in float64, one in
    float32.  Training this ResNet on 8 samples is chaotic after the first
    step: multiplying torch's own float32 parameters by ``1 + 6e-8 * noise``
    (about one rounding) moved its third loss by up to 3.8e-2 (12 tries)
    and its parameters after two steps by up to 2.2 times this tolerance,
    while after one step they stayed within a hundredth of it (40 tries).
    Which rounding a float32 run lands on also differs between a kernel
    that Numba has just compiled and the same kernel loaded from its cache
    (Numba issue 10617), so three float32 steps passed or failed by which
    test process compiled the kernels first."""
    theirs = _model().train().to(dtype)
    ours = nkt.convert(copy.deepcopy(theirs))
    x, labels = _batch(1, n=8)
    want = _train(theirs, steps, x.to(dtype), labels, lr=0.01)
    got = _train(ours, steps, x.to(dtype), labels, lr=0.01)
    assert got == pytest.approx(want, rel=tol, abs=tol)
    for (name, a), (_, b) in zip(ours.state_dict().items(),
                                 theirs.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("variant", ["group_norm_32", "batch_renorm"])
def test_mapped_variants_train(variant):
    """BatchNorm2d swapped in one line; the loss falls over 20 steps on a
    small random-label batch."""
    mapping = {
        "group_norm_32": {nn.BatchNorm2d: lambda bn: nkt.GroupNorm(
            32, bn.num_features)},
        "batch_renorm": {nn.BatchNorm2d: lambda bn: nkt.BatchRenorm(
            bn.num_features)},
    }[variant]
    model = nkt.convert(_model(), mapping).train()
    expected = nkt.GroupNorm if variant == "group_norm_32" else nkt.BatchRenorm
    assert len(_norms(model, expected)) == N_NORMS
    x, labels = _batch(2, n=4, size=16)
    losses = _train(model, 20, x, labels, lr=0.02)
    assert losses[-1] < 0.5 * losses[0], losses


def test_compile_fullgraph_matches_eager():
    """One compile of the converted model (training: forward and backward
    through the custom operators, buffers updated).  The ``aot_eager``
    backend runs Dynamo with ``fullgraph=True`` (any graph break raises)
    and AOTAutograd on the operators' fake implementations without
    Inductor's code generation, which takes minutes for ResNet-18 on a busy
    machine; the operators are the same for every backend."""
    model = nkt.convert(_model()).train()
    reference = copy.deepcopy(model)
    x, labels = _batch(3)
    start = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = nn.functional.cross_entropy(compiled(x), labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    want = nn.functional.cross_entropy(reference(x), labels)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.conv1.weight.grad,
                               reference.conv1.weight.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, reference.bn1.running_var)
    assert int(model.bn1.num_batches_tracked) == 1
    print(f"compile + first step: {elapsed:.1f} s")


def test_inductor_compile_small_block():
    """Inductor on a small conv-norm block: eval and a training step."""
    torch.manual_seed(0)
    block = nkt.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 8, 3),
                                      nn.GroupNorm(2, 8)))
    reference = copy.deepcopy(block)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(block, fullgraph=True)
    compiled(x).sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(block[0].weight.grad, reference[0].weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block[1].running_mean, reference[1].running_mean)


class _Block(nn.Module):
    """A residual block with two normkit layers, compiled one by one as
    large models compile their repeated blocks."""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.bn = nkt.BatchNorm1d(8)
        self.ln = nkt.LayerNorm(8, eps=eps)

    def forward(self, x):
        return x + self.ln(self.bn(self.linear(x)))


def test_blocks_compiled_one_by_one_share_a_graph():
    """Six blocks compiled one by one: two graphs (the first block's, then
    one with the modules' keys as symbols), as for torch's own layers,
    not one per block (each module's key was a constant: past eight
    blocks, fullgraph=True failed on dynamo's recompile limit); a block
    whose LayerNorm has another eps gets its own graph.  Outputs, running
    statistics and gradients as in eager mode."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    blocks = [_Block() for _ in range(6)]
    eager = copy.deepcopy(blocks)
    for block in blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8)
    y, want = x, x
    for block, reference in zip(blocks, eager):
        y, want = block(y), reference(want)
    y.square().sum().backward()
    want.square().sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(y, want)
    for block, reference in zip(blocks, eager):
        torch.testing.assert_close(block.bn.running_var,
                                   reference.bn.running_var)
        torch.testing.assert_close(block.linear.weight.grad,
                                   reference.linear.weight.grad)
    other = _Block(eps=1e-3)
    reference = copy.deepcopy(other)
    other.compile(fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(other(x), reference(x))
    assert counters["stats"]["unique_graphs"] == 3


class _EveryScheme(nn.Module):
    """Every built-in layer whose record depends on the batch's size (or
    the image's), and the plug-in ``PositionNorm``, on one input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norms = nn.Sequential(
            nkt.BatchNorm2d(8), nkt.GroupNorm(2, 8),
            nkt.InstanceNorm2d(8, affine=True), nkt.GhostBatchNorm(8, 2),
            nkt.SchemeModule(PositionNorm()))
        self.linear = nn.Linear(8, 4)
        self.rows = nn.Sequential(nkt.LayerNorm(4), nkt.RMSNorm(4),
                                  nkt.BatchNorm1d(4), nkt.BatchRenorm(4))

    def forward(self, x):
        h = self.norms(self.conv(x))
        return self.rows(self.linear(h.mean((2, 3))))


def _compiled_over_sizes(model, shapes, **options):
    """``model`` compiled with ``options``, trained one step on an input of
    each shape beside an eager copy, outputs, gradients and running
    statistics compared; returns how many graphs dynamo made."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, **options)
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        y, want = compiled(x), eager(x)
        torch.testing.assert_close(y, want)
        y.square().sum().backward()
        want.square().sum().backward()
    for mine, theirs in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)
    for mine, theirs in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(mine, theirs)
    return counters["stats"]["unique_graphs"]


#: Batches of 2 to 6 (even: Ghost BatchNorm's ghost batches of 2) of
#: images of 4 to 6 pixels a side.
_SHAPES = [(2, 3, 5, 4), (4, 3, 4, 6), (6, 3, 6, 5), (4, 3, 5, 5)]


@pytest.mark.parametrize("dynamic, graphs", [(True, 1), (None, 2)])
def test_input_sizes_share_a_graph(dynamic, graphs):
    """Batch and image sizes stay symbols under ``torch.compile``: with
    ``dynamic=True`` one graph serves every size, and by default a second
    one, with the sizes that changed as symbols, serves every later size,
    as for torch's layers (the sizes of each record tensor are products of
    the input's, found by dry runs, and the modules' keys tie to no
    input's size).  Before, every new size made a graph."""
    torch.manual_seed(0)
    assert _compiled_over_sizes(_EveryScheme(), _SHAPES, dynamic=dynamic,
                                backend="aot_eager") == graphs


def test_input_sizes_share_an_inductor_graph():
    """The same with inductor's code, which checks the size of every
    tensor the operators return against the traced one.  (No convolution:
    inductor's convolution backward specializes the image's size, for
    torch's layers too.)"""
    torch.manual_seed(0)
    block = nn.Sequential(nkt.BatchNorm2d(3), nn.ReLU(), nkt.GroupNorm(3, 3))
    assert _compiled_over_sizes(block, _SHAPES, dynamic=True) == 1


def test_export_with_a_dynamic_batch():
    """``torch.export`` with the batch's size a ``Dim``, in both modes: the
    program runs every batch size (before, the size was specialized and
    export refused the ``Dim``)."""
    torch.manual_seed(0)
    model = nkt.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                      nn.GroupNorm(2, 4)))
    batch = {"input": {0: torch.export.Dim("batch", min=2)}}
    for strict in (False, True):
        program = torch.export.export(model, (torch.randn(2, 3, 6, 6),),
                                      dynamic_shapes=batch, strict=strict)
        exported, reference = program.module(), copy.deepcopy(model)
        for n in (3, 7):
            x = torch.randn(n, 3, 6, 6)
            torch.testing.assert_close(exported(x), reference(x))


def test_data_dependent_batch_compiles():
    """Rows picked by a mask make a batch whose size the data decides (an
    unbacked symbol, with no hint): the dry runs take torch's stand-in
    for it, and the graph runs right (before, the trace failed: "Could
    not extract specialized integer from data-dependent expression")."""
    layer = nkt.LayerNorm(4)

    def picked(x):
        return layer(x[x[:, 0] > 0])

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(picked, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), picked(x))


class _EdgeRecord(normkit.Normalizer):
    """A plug-in whose record keeps ``N + 1`` values: not proportional to
    the batch's size."""

    def view(self, shape):
        return normkit.View(1, shape[0], shape[1], 1, 1)

    def _forward(self, x, out=None):
        y, saved = super()._forward(x, out=out)
        extras = {**saved.extras, "edges": np.arange(x.shape[0] + 1.0)}
        return y, saved.replace(extras=extras)


def test_disproportionate_record_specializes():
    """A record size that no product of the input's sizes gives: that size
    is specialized (a graph per batch size, each right)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nkt.SchemeModule(_EdgeRecord()))
    shapes = [(2, 3), (3, 3), (5, 3)]
    assert _compiled_over_sizes(model, shapes, dynamic=True,
                                backend="aot_eager") == 3


def _run_script(script, *args, env=None):
    """What ``script`` prints, run by a fresh Python with ``args``; its
    error output when it fails."""
    done = subprocess.run([sys.executable, "-c", script, *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


#: A training step of a compiled ``GroupNorm(argv[1], 4)``, checked
#: against torch's, under normkit version argv[2] if given; prints the
#: inductor cache's hits.
_COMPILED_GROUP_NORM = """
import sys, torch, normkit.torch as nkt
from torch._dynamo.utils import counters
if len(sys.argv) > 2:  # as if another normkit version
    nkt._ops.__version__ = sys.argv[2]
layer = nkt.GroupNorm(int(sys.argv[1]), 4)
x = torch.randn(2, 4, 3, 3, requires_grad=True)
y = torch.compile(layer, fullgraph=True)(x)
y.sum().backward()
want = torch.nn.functional.group_norm(x, layer.num_groups, layer.weight,
                                      layer.bias)
assert torch.allclose(y, want, atol=1e-5)
print(counters["inductor"]["fxgraph_cache_hit"])
"""


def test_inductor_cache_tells_schemes_apart(tmp_path):
    """Inductor's on-disk cache serves a compiled graph to any later
    process whose graph is the same.  ``GroupNorm(2, 4)``, the first
    scheme registered in its process as ``GroupNorm(1, 4)`` was in an
    earlier one, gets a graph of its own (it got the earlier one before
    the operators took the scheme's signature, its class and settings, and
    that graph's record shapes failed its checks); ``GroupNorm(1, 4)``
    again is served from the cache, but not to another normkit version,
    whose operators may pack the record otherwise (a graph cached before
    the record's mean travelled flattened failed on its shape)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}

    def cache_hits(*args):
        out = _run_script(_COMPILED_GROUP_NORM, *map(str, args), env=env)
        return int(out.split()[-1])

    assert cache_hits(1) == 0
    assert cache_hits(2) == 0
    assert cache_hits(1) > 0
    assert cache_hits(1, "0.0.1") == 0


#: ``torch.export`` of a converted model as a fresh process's first use of
#: normkit, in both of export's modes; the programs run like the model,
#: also saved and loaded again (the training one is saved at argv[1]).
_EXPORT_FIRST = """
import copy, sys, torch, normkit.torch as nkt
torch.manual_seed(0)
model = nkt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                        torch.nn.BatchNorm2d(4),
                                        torch.nn.GroupNorm(2, 4)))
x = torch.randn(2, 3, 6, 6)
for strict in (False, True):
    program = torch.export.export(model, (x,), strict=strict)
    torch.testing.assert_close(program.module()(x), model(x))
torch.export.save(program, sys.argv[1])
loaded = torch.export.load(sys.argv[1]).module()
reference = copy.deepcopy(model)
torch.testing.assert_close(loaded(x), reference(x))
torch.testing.assert_close(loaded.get_buffer("1.running_var"),
                           reference[1].running_var)
print("exported")
"""

#: The program saved by :data:`_EXPORT_FIRST`, run in another process.
_LOAD_ELSEWHERE = """
import sys, torch, normkit.torch
program = torch.export.load(sys.argv[1]).module()
try:
    program(torch.randn(2, 3, 6, 6))
except RuntimeError as error:
    print("refused:", error)
"""


def test_export_as_the_first_use_of_numba(tmp_path):
    """Non-strict ``torch.export`` replaces ``max``, ``min`` and
    ``math.pow`` while it traces; the layout's dry run, there the process's
    first Numba work, runs with Python's own (before, Numba's typing
    tables raised ``AttributeError`` on the replaced ``math.pow``).  The
    program saved and loaded runs in its process (the buffers' update is
    no ``set_grad_enabled`` region, which ``torch.export.load`` refused)
    and is refused, with the reason, in another."""
    path = str(tmp_path / "model.pt2")
    assert _run_script(_EXPORT_FIRST, path).split()[-1] == "exported"
    assert "made in another process" in _run_script(_LOAD_ELSEWHERE, path)


#: ``torch.compile`` as a fresh process's first use of normkit, after
#: ``torch.set_num_threads(1)``.
_COMPILE_FIRST_ONE_THREAD = """
import torch, normkit.torch as nkt
torch.set_num_threads(1)
layer = nkt.GroupNorm(2, 4)
x = torch.randn(2, 4, 3)
y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 2))
assert torch.get_num_threads() == 1, torch.get_num_threads()
print("compiled")
"""


def test_compile_as_the_first_use_keeps_torch_threads():
    """Numba's OpenMP pool shares torch's OpenMP runtime, and its start
    set the runtime's thread count to Numba's: started inside the trace
    (the layout's dry run), that made dynamo refuse it ("Global
    num_threads state changed while dynamo tracing").  normkit starts the
    pool keeping torch's count."""
    assert _run_script(_COMPILE_FIRST_ONE_THREAD).split()[-1] == "compiled"


#: normkit's NumPy API as a fresh process's first normkit work, after
#: ``torch.set_num_threads(1)``: argv[1] names the call.
_NUMPY_FIRST_ONE_THREAD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
assert torch.get_num_threads() == 1
import normkit
x = np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32)
if sys.argv[1] == "batch_norm":
    y, saved = normkit.batch_norm(x, return_saved=True)
    normkit.batch_norm_backward(np.ones_like(y), x, saved)
else:
    normkit.LayerNorm((6,))(x)
print(torch.get_num_threads())
"""


@pytest.mark.parametrize("call", ["batch_norm", "LayerNorm"])
def test_numpy_api_as_the_first_use_keeps_torch_threads(call):
    """The same for normkit's NumPy API, as its first kernel's work plan
    starts the pool (before, torch ran on 2 threads after it)."""
    assert _run_script(_NUMPY_FIRST_ONE_THREAD, call).split()[-1] == "1"


def test_fold_batch_norm():
    model = nkt.convert(_model()).eval()
    x, _ = _batch(4)
    with torch.no_grad():
        want = model(x)
        folded = nkt.fold_batch_norm(model)
        got = folded(x)
    assert not _norms(folded, nkt.BatchNorm2d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # torch's own BatchNorm, and a training-mode one left alone
    torch_model = _model().eval()
    torch_model.layer1[0].bn1.train()
    with torch.no_grad():
        nkt.fold_batch_norm(torch_model)
    assert _norms(torch_model, nn.BatchNorm2d) == [torch_model.layer1[0].bn1]


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)   # depthwise
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 1, groups=2)              # grouped
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_fold_leaves_a_shared_output_alone():
    model = TwoUsers()
    for bn in (model.bn, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = model(x)
        nkt.fold_batch_norm(model)
        got = model(x)
    assert isinstance(model.bn, nn.BatchNorm2d)       # conv output used twice
    assert isinstance(model.bn2, nn.Identity)         # grouped conv folded
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_freeze_batch_norm():
    model = nkt.convert(_model())
    x, labels = _batch(5)
    model.eval()
    with torch.no_grad():
        want = model(x)
    nkt.freeze_batch_norm(model)
    assert not _norms(model, nkt.BatchNorm2d)
    assert len(_norms(model, nkt.FrozenBatchNorm)) == N_NORMS
    model.train()              # frozen: training mode changes nothing
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    names = {n for n, _ in model.named_parameters()}
    assert not any("bn" in n for n in names)


def test_fold_linear_and_batch_norm_1d():
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.ReLU())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model = nkt.convert(model).eval()
    x = torch.randn(4, 5)
    with torch.no_grad():
        want = model(x)
        nkt.fold_batch_norm(model)
        got = model(x)
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
