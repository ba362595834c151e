"""The communicator of the launched rank (tests/test_distributed.py sets
NORMKIT_TEST_COMMUNICATOR; without it these tests skip: they only mean
something on several processes)."""

import os

import pytest


@pytest.fixture(scope="session")
def comm():
    kind = os.environ.get("NORMKIT_TEST_COMMUNICATOR")
    if kind is None:
        pytest.skip("run by tests/test_distributed.py on several processes")
    from normkit import distributed
    if kind == "mpi":
        return distributed.from_mpi()
    return distributed.from_torch()
