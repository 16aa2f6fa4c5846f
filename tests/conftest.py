import pytest
import torch

# Tiny architectures with the real structure: a few stages of width 16-64.
TINY_CVT = dict(dims=(16, 32, 64), heads=(1, 2, 2), depths=(1, 1, 2))
TINY_CEIT = dict(embed_dim=32, num_heads=2, depth=3, img_size=32)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (timm's augmentations draw from `random`)."""
    import random

    import numpy as np
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _local_cluster_nodes(script: str) -> int | None:
    """Nodes of the running cluster that slurm/local_cluster.sh started, 0 for a cluster it did
    not start, None when no Slurm answers."""
    import re
    import subprocess

    proc = subprocess.run([script, "status"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    found = re.match(r"local_cluster: (\d+) node", proc.stdout)
    return int(found.group(1)) if found else 0


def local_slurm(nodes: int):
    """A real Slurm of `nodes` nodes on this machine (slurm/local_cluster.sh), for a fixture to
    yield from: started if it is not running (switching from another node count: the cluster
    that ran before comes back afterwards), stopped afterwards if nothing ran before. Where Slurm
    cannot run, the test fails and says why."""
    import os
    import shutil
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.fail("Slurm is not installed (make setup installs slurmctld slurmd slurm-client munge)")
    script = str(REPO / "slurm" / "local_cluster.sh")
    before = _local_cluster_nodes(script)
    if before == nodes or (before == 0 and nodes == 1):  # a cluster of one's own serves one node
        yield
        return
    if before == 0:
        pytest.fail(f"a Slurm that slurm/local_cluster.sh did not start is running; the {nodes}-node "
                    f"tests need the local one (stop yours first)")
    if os.geteuid() != 0:
        pytest.fail("starting the local Slurm cluster needs root")
    if before is not None:  # switching kills every job: let the ones there finish first
        import time
        deadline = time.time() + 60
        while queued := subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING,SUSPENDED"],
                                       capture_output=True, text=True).stdout.strip():
            if time.time() > deadline:
                pytest.fail(f"the local {before}-node Slurm still has jobs after 60 s; not switching "
                            f"it to {nodes} nodes under them:\n{queued}")
            time.sleep(2)

    def start(n: int) -> None:
        proc = subprocess.run([script, "start", *(["--nodes", str(n)] if n > 1 else [])],
                              capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"local Slurm ({n} node(s)) did not start: {proc.stderr.strip()}")

    try:
        start(nodes)
        yield
    finally:  # also after a failed start: leave no half-built cluster behind
        if before is None:
            subprocess.run([script, "stop"], capture_output=True, timeout=120)
        else:
            start(before)


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
