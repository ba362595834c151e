"""Statistics across processes (normkit.distributed, SyncBatchNorm,
population statistics with a communicator).

In process: the scenarios of tests/distributed/sync_checks.py on a group
of threads (one rank running at a time), for 2 and 3 ranks.  In
processes on localhost: the same scenarios under ``mpiexec -n 2`` and
``-n 3`` (mpi4py) and on 2 processes of torch.distributed with gloo
(torch.multiprocessing spawn), each run as a subprocess with a timeout
(the whole process group is killed when it runs over), skipped where
mpi4py / mpiexec or torch are not installed.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normkit
from normkit import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "distributed"))
import sync_checks  # noqa: E402
from sync_checks import SCENARIOS, ThreadGroup  # noqa: E402

ROOT = HERE.parent


def _id(scenario):
    function, kwargs = scenario
    parts = [function.__name__] + [
        getattr(v, "__name__", str(v)) for v in kwargs.values()]
    return "-".join(parts)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[_id(s) for s in SCENARIOS])
def test_threads(scenario, size):
    function, kwargs = scenario
    assert ThreadGroup(size).run(function, **kwargs) == [True] * size


def test_one_process_is_batchnorm_and_counts():
    comm = distributed.CountingCommunicator()
    sync = normkit.SyncBatchNorm(3, communicator=comm)
    bn = normkit.BatchNorm(3)
    x = np.random.default_rng(0).normal(size=(4, 3, 2))
    np.testing.assert_array_equal(sync(x), bn(x))
    # dy = x lies in the span of 1 and xhat, so dx is a cancellation residue
    # (about 1e-6 of dy): the split and the fused backward kernels, which
    # contract different multiply-adds, agree to the last bits of the O(1)
    # terms, not bit for bit
    np.testing.assert_allclose(sync.backward(x), bn.backward(x), rtol=0,
                               atol=1e-15)
    np.testing.assert_array_equal(sync.running_var, bn.running_var)
    assert comm.count == 2


def test_communicator_checked():
    with pytest.raises(TypeError, match="communicator must be"):
        normkit.SyncBatchNorm(3, communicator=object())
    with pytest.raises(TypeError, match="communicator must be"):
        normkit.reestimate_population_statistics(
            normkit.BatchNorm(3), [np.ones((2, 3))], communicator="world")


def test_state_dict_round_trip():
    sync = normkit.SyncBatchNorm(3)
    sync(np.random.default_rng(0).normal(size=(4, 3)))
    other = normkit.SyncBatchNorm(3)
    other.load_state_dict(sync.state_dict())
    np.testing.assert_array_equal(other.running_var, sync.running_var)
    assert "communicator=local()" in repr(sync)


# --------------------------------------------------------------------------
# processes on localhost
# --------------------------------------------------------------------------

def _run(cmd, timeout, env_extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        **env_extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran over {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def _mpiexec():
    pytest.importorskip("mpi4py")
    found = shutil.which("mpiexec", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip("no mpiexec (pip install 'normkit[mpi]')")
    return found


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi(ranks):
    out = _run([_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py",
                "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/distributed"], 300,
               {"NORMKIT_TEST_COMMUNICATOR": "mpi"})
    assert out.count(" passed") == ranks, out[-3000:]


def test_gloo():
    pytest.importorskip("torch.distributed")
    out = _run([sys.executable, "tests/distributed/spawn_gloo.py", "2"], 300,
               {})
    assert out.count(" passed") == 2, out[-3000:]


# --------------------------------------------------------------------------
# device arrays (the CUDA simulator where there is no GPU)
# --------------------------------------------------------------------------

class _DeviceThreadComm:
    """A rank of a ThreadGroup whose collectives take and return device
    arrays (as NCCL's do)."""

    device_arrays = True

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.seen = []

    def allgather(self, a):
        from numba import cuda
        self.seen.append(normkit.backend.is_device_array(a))
        return cuda.to_device(self.inner.allgather(a.copy_to_host()))

    def allreduce(self, a):
        from numba import cuda
        self.seen.append(normkit.backend.is_device_array(a))
        return cuda.to_device(self.inner.allreduce(a.copy_to_host()))


@pytest.mark.parametrize("device_comm", [False, True])
def test_device_arrays(device_comm):
    cuda = pytest.importorskip("numba.cuda")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off")
    sizes = (2, 3)
    x, dy = sync_checks.global_batch(sizes, 1, np.float32, spatial=(2,))
    ref = normkit.BatchNorm(sync_checks.C)
    y_ref, dx_ref = ref(x), ref.backward(dy)

    def rank(comm):
        if device_comm:
            comm = _DeviceThreadComm(comm)
        sync = normkit.SyncBatchNorm(sync_checks.C, communicator=comm)
        xl = sync_checks.local_slice(x, sizes, comm.rank)
        dyl = sync_checks.local_slice(dy, sizes, comm.rank)
        y = sync(cuda.to_device(xl))
        dx = sync.backward(cuda.to_device(dyl))
        assert normkit.backend.is_device_array(y)
        assert normkit.backend.is_device_array(sync.running_var)
        sync_checks.close("y", y.copy_to_host(),
                          sync_checks.local_slice(y_ref, sizes, comm.rank), 2e-5)
        sync_checks.close("dx", dx.copy_to_host(),
                          sync_checks.local_slice(dx_ref, sizes, comm.rank), 2e-4)
        sync_checks.close("running_var", sync.running_var.copy_to_host(),
                          ref.running_var, 2e-5)
        if device_comm:
            assert comm.seen == [True, True]
        return True

    assert ThreadGroup(2).run(rank) == [True, True]


def test_conformance_kit_on_one_process():
    """The checks every built-in layer passes (gradients by finite
    differences, state, bad input, train/eval), through the synchronized
    code path (a counting communicator, so the collectives are made)."""
    from normkit import testing
    x = np.random.default_rng(0).normal(1.0, 2.0, (4, 3, 5))
    testing.check_conformance(
        lambda: normkit.SyncBatchNorm(
            3, communicator=distributed.CountingCommunicator()), x,
        bad_shapes=[(4, 2, 5)])
