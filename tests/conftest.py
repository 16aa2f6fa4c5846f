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


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm (slurm/local_cluster.sh), started for the session if it is not
    running and stopped afterwards. Where Slurm cannot run, the test fails and says why."""
    import os
    import shutil
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.fail("Slurm is not installed (make setup installs slurmctld slurmd slurm-client munge)")
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.fail("starting the local Slurm cluster needs root")
    script = str(REPO / "slurm" / "local_cluster.sh")
    proc = subprocess.run([script, "start"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"local Slurm did not start: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([script, "stop"], capture_output=True, timeout=60)
