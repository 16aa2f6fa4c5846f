"""Fixtures only; the helpers the tests share are in tests/helpers.py."""
import random

import numpy as np
import pytest
import torch

from helpers import local_slurm


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
