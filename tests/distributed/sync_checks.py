"""Scenarios run on every rank of a group: SyncBatchNorm and population
statistics over ranks against single-process normkit on the global batch.

Each function takes a :class:`normkit.distributed.Communicator` and is
called on every rank with its own (the in-process :class:`ThreadGroup`
below, or MPI / gloo in processes launched by tests/test_distributed.py).
Every rank builds the same global batch from a seed and keeps its slice;
the reference is :class:`normkit.BatchNorm` on the whole batch.
"""

import threading

import numpy as np

import normkit
from normkit import distributed

C = 5
TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 4e-3}

#: Samples per rank: unequal slices, and one rank with none.
SPLITS = {2: {"unequal": (3, 5), "empty": (0, 6)},
          3: {"unequal": (3, 5, 2), "empty": (4, 0, 3)}}


def global_batch(sizes, axis, dtype, seed=0, spatial=(4,)):
    rng = np.random.default_rng(seed)
    N = sum(sizes)
    x = rng.normal(100.0, 0.5, (N, C) + spatial) * rng.uniform(0.5, 2, (1, C) + (1,) * len(spatial))
    dy = rng.standard_normal(x.shape)
    if axis == -1:
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    return x.astype(dtype), dy.astype(dtype)


def local_slice(a, sizes, rank):
    start = sum(sizes[:rank])
    return np.ascontiguousarray(a[start:start + sizes[rank]])


def close(name, got, want, tol):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def same_on_every_rank(comm, name, a):
    """Bit-identical on every rank (the merge is in a fixed order)."""
    every = comm.allgather(np.asarray(a, np.float64).reshape(-1))
    assert all(np.array_equal(row, every[0]) for row in every), \
        f"{name} differs between ranks"


def sync_matches_batchnorm(comm, split="unequal", axis=1, dtype=np.float64,
                           momentum=0.1, steps=2):
    """Output, input and parameter gradients, running statistics after
    ``steps`` training steps: SyncBatchNorm on each rank's slice equals
    BatchNorm on the global batch; one collective per forward and per
    backward; running statistics bit-identical on every rank."""
    sizes = SPLITS[comm.size][split]
    counting = distributed.CountingCommunicator(comm)
    sync = normkit.SyncBatchNorm(C, momentum=momentum, axis=axis,
                                 communicator=counting)
    ref = normkit.BatchNorm(C, momentum=momentum, axis=axis)
    w = np.linspace(0.5, 2.0, C)
    b = np.linspace(-1.0, 1.0, C)
    for layer in (sync, ref):
        layer.weight[...] = w
        layer.bias[...] = b
    tol = TOL[dtype]
    for step in range(steps):
        x, dy = global_batch(sizes, axis, dtype, seed=step)
        xl, dyl = local_slice(x, sizes, comm.rank), local_slice(dy, sizes, comm.rank)
        counting.reset()
        y = sync(xl)
        assert counting.count == 1, counting.calls
        dx = sync.backward(dyl)
        assert counting.count == 2, counting.calls
        assert [c[0] for c in counting.calls] == ["allgather", "allreduce"]
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == xl.shape
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        close("y", y, local_slice(y_ref, sizes, comm.rank), tol)
        close("dx", dx, local_slice(dx_ref, sizes, comm.rank), tol * 10)
        for name in ("weight", "bias"):
            total = comm.allreduce(np.asarray(sync.grads[name], np.float64))
            close(f"d{name}", total, ref.grads[name], tol * 10)
        close("running_mean", sync.running_mean, ref.running_mean, tol)
        close("running_var", sync.running_var, ref.running_var, tol)
        same_on_every_rank(comm, "running_mean", sync.running_mean)
        same_on_every_rank(comm, "running_var", sync.running_var)
    assert sync.num_batches_tracked == steps
    # inference: running statistics, no collective
    counting.reset()
    sync.eval()
    x, _ = global_batch(sizes, axis, dtype, seed=7)
    xl = local_slice(x, sizes, comm.rank)
    close("eval y", sync(xl), local_slice(ref.eval()(x), sizes, comm.rank), tol)
    assert counting.count == 0
    return True


def bad_input_raises_everywhere(comm, bad_rank=1):
    """A rank whose input is bad raises its own error; the others raise a
    RuntimeError naming it (no hang), nothing is updated, and the group
    stays in step: the next step works everywhere."""
    sizes = SPLITS[comm.size]["unequal"]
    sync = normkit.SyncBatchNorm(C, communicator=comm)
    x, dy = global_batch(sizes, 1, np.float64)
    xl, dyl = local_slice(x, sizes, comm.rank), local_slice(dy, sizes, comm.rank)
    bad = comm.rank == bad_rank
    for wrong in (xl[:, :C - 1], xl.astype(np.int64), "not an array"):
        try:
            sync(wrong if bad else xl)
        except ValueError as exc:
            assert bad and "channels" in str(exc), exc
        except TypeError as exc:
            assert bad and "x must" in str(exc), exc
        except RuntimeError as exc:
            assert not bad and f"rank(s) [{bad_rank}]" in str(exc), exc
        else:
            raise AssertionError("no error")
        assert sync.num_batches_tracked == 0
        np.testing.assert_array_equal(sync.running_mean, 0.0)
    sync(xl)                                  # in step again
    try:
        sync.backward(dyl[:, :, :2] if bad else dyl)
    except ValueError as exc:
        assert bad and "shape" in str(exc), exc
    except RuntimeError as exc:
        assert not bad and f"rank(s) [{bad_rank}]" in str(exc), exc
    else:
        raise AssertionError("no error")
    sync.backward(dyl)                        # in step again
    assert sync.num_batches_tracked == 1
    return True


def too_few_values_raise_everywhere(comm):
    """One value per channel over all ranks: every rank raises PyTorch's
    error after the collective (all of them, so none waits)."""
    sync = normkit.SyncBatchNorm(C, communicator=comm)
    n = 1 if comm.rank == 0 else 0
    try:
        sync(np.ones((n, C)))
    except ValueError as exc:
        assert "more than 1 value per channel" in str(exc), exc
    else:
        raise AssertionError("no error")
    # two values over the ranks are enough, one of them here
    y = sync(np.full((1 if comm.rank < 2 else 0, C), float(comm.rank)))
    if comm.rank < 2:
        close("y", y, np.full((1, C), (-1.0, 1.0)[comm.rank]), 1e-4)
    return True


def population_pooled_over_ranks(comm):
    """reestimate_population_statistics(communicator=...) pools every
    rank's batches: equal to one process seeing all of them."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, (n, C, 3)) for n in (4, 6, 5, 3, 2, 7)]
    mine = batches[comm.rank::comm.size]
    layer = normkit.BatchNorm(C)
    got = normkit.reestimate_population_statistics(layer, mine,
                                                   communicator=comm)[0]
    ref = normkit.BatchNorm(C)
    want = normkit.reestimate_population_statistics(ref, batches)[0]
    close("population mean", layer.running_mean, ref.running_mean, 1e-12)
    close("population var", layer.running_var, ref.running_var, 1e-12)
    assert got["batches"] == want["batches"] and got["values"] == want["values"]
    same_on_every_rank(comm, "population var", layer.running_var)
    return True


def population_failure_raises_everywhere(comm, bad_rank=1):
    """A rank whose batches are bad raises its own error during the pass;
    the others raise a RuntimeError naming it, none writes estimates."""
    layer = normkit.BatchNorm(C)
    shape = (4, C - 1) if comm.rank == bad_rank else (4, C)
    try:
        normkit.reestimate_population_statistics(
            layer, [np.ones(shape)], communicator=comm, sequential=True)
    except ValueError as exc:
        assert comm.rank == bad_rank and "channels" in str(exc), exc
    except RuntimeError as exc:
        assert comm.rank != bad_rank and f"rank(s) [{bad_rank}]" in str(exc), exc
    else:
        raise AssertionError("no error")
    np.testing.assert_array_equal(layer.running_var, 1.0)
    return True


SCENARIOS = [
    (sync_matches_batchnorm, dict(split=split, axis=axis, dtype=dtype, momentum=m))
    for split in ("unequal", "empty")
    for axis in (1, -1)
    for dtype in (np.float64, np.float32, np.float16)
    for m in ((0.1,) if dtype is not np.float64 else (0.1, None))
] + [(bad_input_raises_everywhere, {}), (too_few_values_raise_everywhere, {}),
     (population_pooled_over_ranks, {}),
     (population_failure_raises_everywhere, {})]


# --------------------------------------------------------------------------
# an in-process group: one thread per rank, one running at a time
# --------------------------------------------------------------------------

class ThreadGroup:
    """``size`` ranks as threads of this process.  Only one rank runs at a
    time (each holds the group's lock except while waiting in a
    collective), so Numba's kernels are never entered concurrently; the
    collectives check that every rank makes the same call and time out
    instead of hanging."""

    def __init__(self, size, timeout=60.0):
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.rounds = {}

    def run(self, function, **kwargs):
        """``function(comm, **kwargs)`` on every rank; returns the results
        in rank order, or raises the first rank's exception."""
        results = [None] * self.size
        errors = [None] * self.size

        def body(rank):
            comm = _ThreadComm(self, rank)
            with self.cond:
                try:
                    results[rank] = function(comm, **kwargs)
                except BaseException as exc:      # reported below
                    errors[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), daemon=True)
                   for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 4)
        for rank, exc in enumerate(errors):
            if exc is not None:
                raise AssertionError(f"rank {rank}: {exc!r}") from exc
        return results

    def _collective(self, rank, index, op, a):
        key = index
        entry = self.rounds.setdefault(key, {"op": (op, a.shape), "parts": {}})
        if entry["op"] != (op, a.shape):
            raise RuntimeError(f"collective {index}: rank {rank} called {op} "
                               f"{a.shape}, another rank {entry['op']}")
        entry["parts"][rank] = np.array(a, np.float64)
        self.cond.notify_all()
        if not self.cond.wait_for(lambda: len(entry["parts"]) == self.size,
                                  self.timeout):
            raise TimeoutError(f"collective {index} ({op}): only ranks "
                               f"{sorted(entry['parts'])} arrived")
        parts = np.stack([entry["parts"][r] for r in range(self.size)])
        return parts if op == "allgather" else parts.sum(axis=0)


class _ThreadComm:
    device_arrays = False

    def __init__(self, group, rank):
        self.group = group
        self.rank = rank
        self.size = group.size
        self.calls = 0

    def _call(self, op, a):
        self.calls += 1
        return self.group._collective(self.rank, self.calls, op,
                                      np.asarray(a))

    def allgather(self, a):
        return self._call("allgather", a)

    def allreduce(self, a):
        return self._call("allreduce", a)
