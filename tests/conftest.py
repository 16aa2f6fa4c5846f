"""Fixtures, and the one xdist worker of the Slurm tests; the helpers the tests share are in tests/helpers.py."""
import random

import numpy as np
import pytest
import torch

from helpers import local_slurm


SLURM_FIXTURES = {"slurm_cluster", "slurm_two_nodes"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """`make test` runs the suite on two workers (pytest-xdist, `--dist loadgroup`). The tests of
    the one local Slurm go to one worker, in their order: the two-node tests switch the cluster
    under any job still running. They come first, as the longest unit of work, and the other
    tests go to whichever worker is free."""
    slurm = [item for item in items if SLURM_FIXTURES & set(item.fixturenames)]
    for item in slurm:
        item.add_marker(pytest.mark.xdist_group("slurm"))
    grouped = set(map(id, slurm))
    items[:] = slurm + [item for item in items if id(item) not in grouped]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (timm's augmentations draw from `random`)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm, or the cluster already running unless it is the local
    multi-node one."""
    yield from local_slurm(1)


@pytest.fixture(scope="module")
def slurm_two_nodes():
    """The local two-node Slurm (slurm/local_cluster.sh start --nodes 2): nodes node1 and node2,
    each a network namespace with its own address and hostname, one CPU each."""
    yield from local_slurm(2)
