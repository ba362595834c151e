"""Every scenario of sync_checks on this rank's communicator (MPI or
gloo), as launched by tests/test_distributed.py:

    mpiexec -n 2 python -m mpi4py -m pytest -q tests/distributed
    python tests/distributed/spawn_gloo.py 2
"""

import os

import pytest

from sync_checks import SCENARIOS


@pytest.fixture(scope="session")
def comm():
    """This rank's communicator (tests/test_distributed.py sets
    NORMKIT_TEST_COMMUNICATOR; without it these tests skip: they only mean
    something on several processes).  No conftest.py here: the suite's
    modules import helpers with ``from conftest import ...``."""
    kind = os.environ.get("NORMKIT_TEST_COMMUNICATOR")
    if kind is None:
        pytest.skip("run by tests/test_distributed.py on several processes")
    from normkit import distributed
    if kind == "mpi":
        return distributed.from_mpi()
    return distributed.from_torch()


def _id(scenario):
    function, kwargs = scenario
    return "-".join([function.__name__] + [
        getattr(v, "__name__", str(v)) for v in kwargs.values()])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[_id(s) for s in SCENARIOS])
def test_scenario(comm, scenario):
    function, kwargs = scenario
    if comm.size not in (2, 3):
        pytest.skip("scenarios are written for 2 or 3 ranks")
    assert function(comm, **kwargs)
