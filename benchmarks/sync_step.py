"""Per-step cost of synchronizing BatchNorm over 2 processes (CPU).

One training step (forward and backward) of normkit.SyncBatchNorm on a
rank's slice against normkit.BatchNorm on the same slice, timed in turn
(interleaved, so drift of the machine affects both alike), and the two
collectives alone (an all-gather of 3*C and an all-reduce of 2*C + size
float64 values) lined up, and a BatchNorm step with those collectives
after its forward and its backward (what any synchronized step pays for
transport and for waiting on the slower rank), over MPI (mpi4py) or
torch.distributed with gloo:

    mpiexec -n 2 python benchmarks/sync_step.py mpi
    python benchmarks/sync_step.py gloo          # spawns 2 processes

``torch`` mode (2 gloo processes too) times a training step through
autograd of the torch modules instead: normkit.torch.SyncBatchNorm over
the world group against normkit.torch.BatchNorm2d (and torch's own
torch.nn.BatchNorm2d) on the same local slice:

    python benchmarks/sync_step.py torch

Each rank runs its kernels on one Numba thread (2 processes on 2 cores;
set NUMBA_NUM_THREADS=1 too, so that no idle pool threads spin).
Prints one line per configuration (rank 0; the medians are of the slower
rank's time per step, steps being synchronized).
"""

import datetime
import json
import os
import socket
import sys
import time

import numpy as np

STEPS = int(os.environ.get("SYNC_BENCH_STEPS", "60"))
WARMUP = 5
CONFIGS = [(64, (32, 64, 4, 4)), (1024, (32, 1024, 4, 4))]   # (C, local slice)


def _median_max(comm, samples):
    """Median over steps of the slower rank's time (seconds)."""
    every = comm.allgather(np.asarray(samples, np.float64))
    return float(np.median(every.max(axis=0)))


def run(comm, kind):
    import numba
    import normkit
    numba.set_num_threads(1)
    rows = []
    for C, shape in CONFIGS:
        rng = np.random.default_rng(comm.rank)
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        sync = normkit.SyncBatchNorm(C, communicator=comm)
        local = normkit.BatchNorm(C)
        gather = np.zeros((3, C))
        reduce = np.zeros(2 * C + comm.size)
        times = {"batchnorm": [], "sync": [], "collectives": [],
                 "batchnorm_then_collectives": []}
        for step in range(WARMUP + STEPS):
            comm.allreduce(np.zeros(1))                  # line the ranks up
            t0 = time.perf_counter()
            local(x)
            local.backward(dy)
            t1 = time.perf_counter()
            comm.allreduce(np.zeros(1))
            t2 = time.perf_counter()
            sync(x)
            sync.backward(dy)
            t3 = time.perf_counter()
            comm.allreduce(np.zeros(1))
            t4 = time.perf_counter()
            comm.allgather(gather)
            comm.allreduce(reduce)
            t5 = time.perf_counter()
            comm.allreduce(np.zeros(1))
            t6 = time.perf_counter()
            local(x)
            comm.allgather(gather)
            local.backward(dy)
            comm.allreduce(reduce)
            t7 = time.perf_counter()
            if step >= WARMUP:
                times["batchnorm_then_collectives"].append(t7 - t6)
                times["batchnorm"].append(t1 - t0)
                times["sync"].append(t3 - t2)
                times["collectives"].append(t5 - t4)
        med = {k: _median_max(comm, v) * 1e3 for k, v in times.items()}
        row = dict(transport=kind, C=C, shape=list(shape), ranks=comm.size,
                   steps=STEPS, **{f"{k}_ms": round(v, 4) for k, v in med.items()},
                   overhead_ms=round(med["sync"] - med["batchnorm"], 4))
        rows.append(row)
        if comm.rank == 0:
            print(json.dumps(row), flush=True)
    return rows


def _interleaved(comm, cases):
    """Median (ms) of the slower rank's time per call of each case, the
    cases run in turn at every step, the ranks lined up before each."""
    times = {name: [] for name in cases}
    for step in range(WARMUP + STEPS):
        for name, case in cases.items():
            comm.allreduce(np.zeros(1))
            t0 = time.perf_counter()
            case()
            t1 = time.perf_counter()
            if step >= WARMUP:
                times[name].append(t1 - t0)
    return {k: _median_max(comm, v) * 1e3 for k, v in times.items()}


def run_torch(comm):
    """A training step (forward, backward through autograd) of
    normkit.torch.SyncBatchNorm against normkit.torch.BatchNorm2d and
    torch.nn.BatchNorm2d on this rank's slice, the step's two collectives
    alone, and a normkit.torch.BatchNorm2d step with those collectives
    after its forward and its backward."""
    import numba
    import torch
    import normkit.torch as nkt
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    rows = []
    for C, shape in CONFIGS:
        g = torch.Generator().manual_seed(comm.rank)
        x = torch.randn(shape, generator=g).requires_grad_()
        dy = torch.randn(shape, generator=g)
        layers = {"sync": nkt.SyncBatchNorm(C),
                  "batchnorm": nkt.BatchNorm2d(C),
                  "torch_batchnorm": torch.nn.BatchNorm2d(C)}

        def step(layer):
            def call():
                x.grad = None
                layer(x).backward(dy)
            return call

        cases = {k: step(v) for k, v in layers.items()}
        gather, reduce = np.zeros((3, C)), np.zeros(2 * C + comm.size)
        cases["collectives"] = lambda: (comm.allgather(gather),
                                        comm.allreduce(reduce))

        def batchnorm_then_collectives(layer=layers["batchnorm"]):
            x.grad = None
            y = layer(x)
            comm.allgather(gather)
            y.backward(dy)
            comm.allreduce(reduce)

        cases["batchnorm_then_collectives"] = batchnorm_then_collectives
        med = _interleaved(comm, cases)
        row = dict(transport="gloo", modules="normkit.torch", C=C,
                   shape=list(shape), ranks=comm.size, steps=STEPS,
                   **{f"{k}_ms": round(v, 4) for k, v in med.items()},
                   overhead_ms=round(med["sync"] - med["batchnorm"], 4))
        rows.append(row)
        if comm.rank == 0:
            print(json.dumps(row), flush=True)
    return rows


def _gloo_rank(rank, port, kind="gloo"):
    import torch.distributed as dist
    from normkit import distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        if kind == "torch":
            run_torch(distributed.from_torch())
        else:
            run(distributed.from_torch(), "gloo")
    finally:
        dist.destroy_process_group()


def main():
    kind = sys.argv[1] if len(sys.argv) > 1 else "mpi"
    if kind == "mpi":
        from normkit import distributed
        run(distributed.from_mpi(), "mpi")
    elif kind in ("gloo", "torch"):
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_gloo_rank, args=(port, kind), nprocs=2, join=True)
    else:
        raise SystemExit("usage: sync_step.py mpi|gloo|torch")


if __name__ == "__main__":
    main()
