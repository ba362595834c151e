"""normkit.torch.SyncBatchNorm and convert_sync_batchnorm.

The scenarios of tests/distributed/torch_sync_checks.py (output, input and
parameter gradients, running statistics against torch.nn.BatchNorm2d on
the global batch; unequal and empty slices; channels-first and
channels_last; float64/32/16; collectives counted; bad input on one rank;
DistributedDataParallel) run on an in-process group of threads for 2 and
3 ranks, and on 2 and 3 processes of torch.distributed with gloo on
localhost (a subprocess with a timeout; collectives time out after 30 s).
One process: torch's state_dict, BatchNorm without a process group,
conversion, opcheck on a gloo group of one process.
"""

import datetime
import socket
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import normkit.torch as nkt  # noqa: E402
from normkit import distributed  # noqa: E402
from normkit.torch import _ops  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "distributed"))
import torch_sync_checks as checks  # noqa: E402
from sync_checks import ThreadGroup  # noqa: E402
from test_distributed import _run  # noqa: E402

IN_PROCESS = [s for s in checks.SCENARIOS
              if s[0] not in (checks.ddp_step_matches_one_process,
                              checks.compiled_matches_eager)]


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("scenario", IN_PROCESS,
                         ids=[checks.scenario_id(s) for s in IN_PROCESS])
def test_threads(scenario, size):
    function, kwargs = scenario
    assert ThreadGroup(size).run(function, **kwargs) == [True] * size


@pytest.mark.parametrize("nprocs, keep", [
    (2, []),                                # every scenario, DDP, compile
    (3, ["unequal-contiguous-float64", "empty-channels_last-float32",
         "counts", "bad_input", "forwards_then", "ddp"]),
])
def test_gloo_processes(nprocs, keep):
    out = _run([sys.executable, "tests/distributed/torch_gloo.py",
                str(nprocs)] + keep, 240, {})
    assert f"all {nprocs} ranks passed" in out, out[-3000:]
    assert out.count(": ok ddp_step") == nprocs, out[-3000:]
    if not keep:
        assert out.count(": ok compiled_matches_eager") == nprocs, out[-3000:]


# --------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------

def test_state_dict_is_torchs():
    ours = nkt.SyncBatchNorm(4, momentum=None)
    theirs = torch.nn.SyncBatchNorm(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.running_mean.fill_(2.0)
        theirs.weight.fill_(3.0)
    ours.load_state_dict(theirs.state_dict())
    assert float(ours.running_mean[0]) == 2.0
    assert float(ours.weight[1].detach()) == 3.0
    theirs.load_state_dict(nkt.SyncBatchNorm(4).state_dict())
    assert not nkt.SyncBatchNorm(4, affine=False).state_dict().get("weight")
    assert ours.process_group is None and ours.momentum is None


def test_without_process_group_is_batchnorm():
    """torch.distributed not initialized: BatchNorm on the local batch (any
    input rank >= 2), as torch's SyncBatchNorm; one process counts its
    collectives all the same."""
    assert not dist.is_initialized()
    for shape in [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 3)]:
        sync = nkt.SyncBatchNorm(3)
        ref = torch.nn.BatchNorm1d(3) if len(shape) < 4 else (
            torch.nn.BatchNorm2d(3) if len(shape) == 4 else torch.nn.BatchNorm3d(3))
        x = torch.randn(shape, requires_grad=True)
        y, y_ref = sync(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn(shape)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0],
                                   torch.autograd.grad(y_ref, x, g)[0])
        torch.testing.assert_close(sync.running_var, ref.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nkt.SyncBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2D"):
        nkt.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(TypeError, match="communicator must be"):
        nkt.SyncBatchNorm(3, communicator="world")


def test_copies_and_pickles_without_the_group():
    import copy
    import pickle
    sync = nkt.SyncBatchNorm(3)
    sync(torch.randn(4, 3))
    for other in (copy.deepcopy(sync), pickle.loads(pickle.dumps(sync))):
        torch.testing.assert_close(other.running_var, sync.running_var)
        assert other(torch.randn(4, 3)).shape == (4, 3)


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False),
                            torch.nn.BatchNorm3d(4, momentum=None, eps=1e-3)),
        nkt.BatchNorm2d(4), torch.nn.InstanceNorm2d(4), nkt.GroupNorm(2, 4),
        torch.nn.SyncBatchNorm(4, track_running_stats=False),
        torch.nn.BatchNorm2d(4, bias=False))


def test_convert_sync_batchnorm_carries_everything():
    model = _model().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.uniform_()
    model[1].bias.requires_grad_(False)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    types = {name: type(m) for name, m in model.named_modules()}
    out = nkt.convert_sync_batchnorm(model)
    assert out is model
    for name in ("1", "2.0", "2.1", "3", "6", "7"):
        layer = model.get_submodule(name)
        assert isinstance(layer, nkt.SyncBatchNorm), name
        assert not layer.training, name
        assert all(t.dtype == torch.float64 for t in
                   list(layer.parameters()) + list(layer.buffers())
                   if t.is_floating_point()), name
    for name in ("0", "4", "5"):
        assert type(model.get_submodule(name)) is types[name]
    after = model.state_dict()
    assert list(after) == list(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[2][1].momentum is None and model[2][1].eps == 1e-3
    assert model[2][0].weight is None and model[6].running_mean is None
    assert model[7].bias is None and "bias=False" in repr(model[7])
    assert model[1].weight.dtype == torch.float64
    # already synchronized: left alone; a BatchNorm on its own: converted
    assert nkt.convert_sync_batchnorm(model)[1] is model[1]
    top = nkt.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.BatchNorm2d(4).train(), process_group=None)
    assert isinstance(top, nkt.SyncBatchNorm) and top.training


def test_converted_model_matches_in_train_and_eval():
    """One process: the converted model is the model, in both modes."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                torch.nn.BatchNorm2d(4), nkt.BatchNorm2d(4))
    ref = copy.deepcopy(model)
    nkt.convert_sync_batchnorm(model)
    x = torch.randn(4, 3, 6, 6)
    for mode in (True, False):
        torch.testing.assert_close(model.train(mode)(x), ref.train(mode)(x))
    torch.testing.assert_close(model[2].running_var, ref[2].running_var)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """torch.distributed initialized with gloo, world size 1, for the
    duration of the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_on_a_gloo_group(gloo_world_of_one, layout):
    """The custom operator with a SyncBatchNorm over a real gloo group
    (world size 1): schema, fake tensors (whose dry run must not start a
    collective), autograd registration, AOT dispatch; the layout learned
    before any eager call."""
    comm = distributed.CountingCommunicator(distributed.from_torch())
    sync = nkt.SyncBatchNorm(3, communicator=comm, dtype=torch.float64)
    params = [sync.weight, sync.bias]
    buffers = [sync.running_mean, sync.running_var, sync.num_batches_tracked]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) + 5.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in [x] + params + buffers]
        out = _ops.scheme_forward(fake[0], fake[1:3], fake[3:],
                                  *sync._operator_key, True)
    assert comm.count == 0                    # the dry run contacted no one
    assert out[3].shape == (3 + 1,)           # var and the global count
    torch.library.opcheck(_ops.scheme_forward,
                          (x.requires_grad_(), params,
                           [b.clone() for b in buffers],
                           *sync._operator_key, True))
    assert comm.count > 0
    y = sync(x)
    assert float(sync.num_batches_tracked) == 1
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        y, torch.nn.functional.batch_norm(x, None, None, sync.weight,
                                          sync.bias, True))


def test_compile_after_eager(gloo_world_of_one):
    """torch.compile(fullgraph=True) of a converted model: the operator
    stays in the graph and matches eager, collectives included."""
    torch.manual_seed(0)
    model = nkt.convert_sync_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()))
    x = torch.randn(4, 3, 6, 6)
    import copy
    twin = copy.deepcopy(model)
    want = twin(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
