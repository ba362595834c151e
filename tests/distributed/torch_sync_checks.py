"""Scenarios of normkit.torch.SyncBatchNorm run on every rank of a group,
against single-process ``torch.nn.BatchNorm2d`` on the global batch.

Each function takes a :class:`normkit.distributed.Communicator` and is
called on every rank with its own: the in-process
:class:`sync_checks.ThreadGroup` (the module gets ``communicator=``), or
``from_torch()`` on processes of torch.distributed with gloo (the module
gets ``process_group=``, its default path), launched by
``tests/distributed/torch_gloo.py``.  Every rank builds the same global
batch from a seed and keeps its slice; the reference runs on the whole
batch in float64.
"""

import copy

import numpy as np
import torch

import normkit.torch as nkt
from normkit import distributed

C = 5
#: Samples per rank: unequal slices, and one rank with none.
SPLITS = {1: {"unequal": (4,), "empty": (4,)},
          2: {"unequal": (3, 5), "empty": (0, 6)},
          3: {"unequal": (3, 5, 2), "empty": (4, 0, 3)}}
DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "float16": torch.float16}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3}


def sync_module(comm, num_features=C, counting=False, **kwargs):
    """normkit.torch.SyncBatchNorm over ``comm``: through ``process_group``
    for a torch.distributed communicator (the path users take), else
    ``communicator=`` (``counting``: wrapped to count collectives)."""
    if counting:
        comm = distributed.CountingCommunicator(comm)
        return nkt.SyncBatchNorm(num_features, communicator=comm, **kwargs), comm
    if isinstance(comm, distributed._Torch):
        return nkt.SyncBatchNorm(num_features, process_group=comm.group,
                                 **kwargs)
    return nkt.SyncBatchNorm(num_features, communicator=comm, **kwargs)


def global_batch(sizes, seed=0, spatial=(3, 2)):
    """Float64 ``(x, dy)`` of ``sum(sizes)`` samples: channels near 100
    with small spreads (the cancellation case)."""
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), C) + spatial
    scale = torch.rand((1, C, 1, 1), generator=g, dtype=torch.float64) * 1.5 + 0.5
    x = 100.0 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) * scale
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dy


def local_slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def close(name, got, want, tol):
    got = got.detach().double()
    want = want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if want.numel() == 0:
        return
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def all_sum(comm, t):
    """Sum of ``t`` over ranks (float64 tensor)."""
    return torch.from_numpy(comm.allreduce(t.detach().double().numpy()))


def module_matches_batchnorm(comm, split="unequal", layout="contiguous",
                             dtype="float64", steps=2):
    """Output, input gradient, parameter gradients (summed over ranks) and
    running statistics after ``steps`` training steps equal
    torch.nn.BatchNorm2d on the global batch; channels-last stays
    channels-last; float16 forward only (with its running statistics)."""
    dtype = DTYPES[dtype]
    sizes = SPLITS[comm.size][split]
    sync = sync_module(comm, dtype=dtype)
    ref = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    with torch.no_grad():
        for layer in (sync, ref):
            layer.weight.copy_(torch.linspace(0.5, 2.0, C))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, C))
    tol = TOL[dtype]
    backward = dtype != torch.float16
    for step in range(steps):
        x, dy = (t.to(dtype).double() for t in global_batch(sizes, seed=step))
        xl = local_slice(x, sizes, comm.rank).to(dtype)
        dyl = local_slice(dy, sizes, comm.rank).to(dtype)
        if layout == "channels_last":
            xl = xl.contiguous(memory_format=torch.channels_last)
        xl.requires_grad_(backward)
        y = sync(xl)
        assert y.dtype == dtype and y.shape == xl.shape
        if layout == "channels_last" and xl.numel():
            assert y.is_contiguous(memory_format=torch.channels_last)
        xr = x.clone().requires_grad_()
        y_ref = ref(xr)
        close("y", y, local_slice(y_ref, sizes, comm.rank), tol)
        if backward:
            sync.zero_grad()
            ref.zero_grad()
            (y * dyl).sum().backward()
            (y_ref * dy).sum().backward()
            close("dx", xl.grad, local_slice(xr.grad, sizes, comm.rank), tol * 10)
            for name in ("weight", "bias"):
                close(f"d{name}", all_sum(comm, getattr(sync, name).grad),
                      getattr(ref, name).grad, tol * 10)
        close("running_mean", sync.running_mean, ref.running_mean, tol)
        close("running_var", sync.running_var, ref.running_var, tol)
        every = comm.allgather(sync.running_var.double().numpy())
        assert all(np.array_equal(row, every[0]) for row in every), \
            "running_var differs between ranks"
    assert int(sync.num_batches_tracked) == steps
    sync.eval()
    ref.eval()
    x = global_batch(sizes, seed=9)[0].to(dtype).double()
    close("eval y", sync(local_slice(x, sizes, comm.rank).to(dtype)),
          local_slice(ref(x), sizes, comm.rank), tol)
    return True


def counts_collectives(comm):
    """One collective per training forward, one per backward, whatever
    the number of channels; none in eval."""
    sizes = SPLITS[comm.size]["unequal"]
    for channels in (3, 64):
        sync, counting = sync_module(comm, channels, counting=True)
        x = torch.randn(sizes[comm.rank], channels, 4, requires_grad=True)
        y = sync(x)
        assert counting.count == 1, counting.calls
        y.square().sum().backward()
        assert [c[0] for c in counting.calls] == ["allgather", "allreduce"], \
            counting.calls
        sync.eval()
        sync(x)
        assert counting.count == 2, counting.calls
    return True


def bad_input_raises_everywhere(comm, bad_rank=1):
    """A rank whose input is bad raises its own error (torch's types and
    messages); every other rank raises a RuntimeError naming it instead
    of waiting; nothing is updated; the next step works everywhere."""
    sizes = SPLITS[comm.size]["unequal"]
    sync = sync_module(comm)
    x, dy = global_batch(sizes)
    xl = local_slice(x, sizes, comm.rank).float()
    bad = comm.rank == bad_rank
    for wrong, kind, text in ((xl[:, :C - 1], ValueError, "channels"),
                              (xl.int(), TypeError, "floating dtype"),
                              (xl[0, 0, 0], ValueError, "at least 2D"),
                              ("not a tensor", TypeError, "torch.Tensor")):
        try:
            sync(wrong if bad else xl)
        except RuntimeError as exc:
            if bad and isinstance(exc, kind) and text in str(exc):
                pass
            else:
                assert not bad and f"rank(s) [{bad_rank}]" in str(exc), exc
        except Exception as exc:
            assert bad and isinstance(exc, kind) and text in str(exc), exc
        else:
            raise AssertionError("no error")
        assert int(sync.num_batches_tracked) == 0
        assert float(sync.running_mean.abs().max()) == 0.0
    y = sync(xl.requires_grad_())                     # in step again
    y.sum().backward()
    assert int(sync.num_batches_tracked) == 1
    return True


def forwards_then_backwards(comm):
    """Two forwards before their backwards, the other ranks' batch sizes
    changing in between while this rank's shape stays: each backward uses
    its own forward's global count (it travels with the autograd graph,
    not in the layout cached per input shape)."""
    sync = sync_module(comm, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    grads, want = [], []
    for seed, sizes in ((0, (4,) + (2,) * (comm.size - 1)),
                        (1, (4,) + (5,) * (comm.size - 1))):
        x, dy = global_batch(sizes, seed=seed)
        xl = local_slice(x, sizes, comm.rank).clone().requires_grad_()
        grads.append((xl, (sync(xl) * local_slice(dy, sizes, comm.rank)).sum()))
        xr = x.clone().requires_grad_()
        (ref(xr) * dy).sum().backward()
        want.append(local_slice(xr.grad, sizes, comm.rank))
    for (xl, loss), dx in zip(grads, want):
        loss.backward()
        close("dx", xl.grad, dx, 1e-9)
    return True


class _Net(torch.nn.Module):
    """A small conv net, BatchNorm after each convolution."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
            torch.nn.Conv2d(6, 8, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.body(x)


def ddp_step_matches_one_process(comm, steps=2):
    """A conv net converted by convert_sync_batchnorm and wrapped in
    DistributedDataParallel, half the batch on each rank: ``steps`` SGD
    steps give the parameters and running statistics of one process
    training on the whole batch with torch's BatchNorm2d.  Processes of
    torch.distributed only (DDP needs a process group)."""
    if not isinstance(comm, distributed._Torch):
        return True
    torch.manual_seed(0)
    ref = _Net().double()
    model = nkt.convert_sync_batchnorm(copy.deepcopy(ref), comm.group)
    assert sum(isinstance(m, nkt.SyncBatchNorm) for m in model.modules()) == 2
    ddp = torch.nn.parallel.DistributedDataParallel(model,
                                                    process_group=comm.group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    per_rank = 4
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(per_rank * comm.size, 3, 6, 6, generator=g,
                        dtype=torch.float64)
        target = torch.randint(0, 4, (per_rank * comm.size,), generator=g)
        mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[mine]), target[mine]).backward()
        opt.step()
        opt_ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), target).backward()
        opt_ref.step()
    for (name, p), (_, p_ref) in zip(model.state_dict().items(),
                                     ref.state_dict().items()):
        close(name, p.double(), p_ref.double(), 1e-9)
    return True


def compiled_matches_eager(comm):
    """``torch.compile(fullgraph=True)`` (AOT autograd, no C++ build) of a
    converted model, slices of unequal size: output, gradients and
    running statistics equal eager mode's, collectives included (the
    communicator is made inside the operator at run time, not while
    tracing).  Processes of torch.distributed only."""
    if not isinstance(comm, distributed._Torch):
        return True
    torch.manual_seed(0)
    model = nkt.convert_sync_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3 + 2 * comm.rank, 3, 6, 6)
    for net in (compiled, twin):
        net(x).square().sum().backward()
    eager_first = torch.randn(2, 3, 6, 6)
    close("y", compiled(eager_first), twin(eager_first), 1e-6)
    close("dweight", model[1].weight.grad, twin[1].weight.grad, 1e-5)
    close("dconv", model[0].weight.grad, twin[0].weight.grad, 1e-5)
    close("running_var", model[1].running_var, twin[1].running_var, 1e-6)
    return True


SCENARIOS = [
    (module_matches_batchnorm, dict(split=split, layout=layout, dtype=dtype))
    for split in ("unequal", "empty")
    for layout in ("contiguous", "channels_last")
    for dtype in ("float64", "float32", "float16")
] + [(counts_collectives, {}), (bad_input_raises_everywhere, {}),
     (forwards_then_backwards, {}),
     (ddp_step_matches_one_process, {}), (compiled_matches_eager, {})]


def scenario_id(scenario):
    function, kwargs = scenario
    return "-".join([function.__name__] + [str(v) for v in kwargs.values()])
