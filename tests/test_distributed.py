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
    np.testing.assert_array_equal(sync.backward(x), bn.backward(x))
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
                "tests/distributed"], 600,
               {"NORMKIT_TEST_COMMUNICATOR": "mpi"})
    assert out.count(" passed") == ranks, out[-3000:]


def test_gloo():
    pytest.importorskip("torch.distributed")
    out = _run([sys.executable, "tests/distributed/spawn_gloo.py", "2"], 600,
               {})
    assert out.count(" passed") == 2, out[-3000:]
