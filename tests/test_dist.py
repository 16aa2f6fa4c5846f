"""Rank discovery for a single process, torchrun/deepspeed, and Slurm's srun (real where possible)."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from cvtkit.dist import default_port, discover, first_host, launch_local

from helpers import REPO


def test_single_process():
    d = discover({})
    assert (d.rank, d.local_rank, d.world_size, d.launcher, d.is_main) == (0, 0, 1, "single", True)


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    d = discover(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.master_port, d.launcher) == \
        (5, 1, 8, "n1", 1234, "torchrun")


def test_slurm_step_and_batch_shell():
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    d = discover(step)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.launcher) == (3, 1, 4, "gpu007", "slurm")
    assert d.master_port == 20000 + 123456 % 20000
    batch_shell = {k: v for k, v in step.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    assert discover(batch_shell).launcher == "single"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer, got 'two'"):
        discover({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="rank 4 is outside a world of 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("nodelist,host", [("vm", "vm"), ("gpu[003-005,010],cpu1", "gpu003"),
                                           ("a1,b2", "a1"), ("node[09]", "node09")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_export_sets_env_init_variables():
    env = {}
    discover({"RANK": "1", "WORLD_SIZE": "2"}).export(env)
    assert env == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29500"}
    assert default_port(None) == 29500


RANK_THAT_WAITS = """
import os, sys
import torch, torch.distributed as dist
print(os.environ["MASTER_PORT"], flush=True)
sys.stdin.readline()  # the test tries the port meanwhile, then lets the ranks meet
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
print(int(t.item()), flush=True)
dist.destroy_process_group()  # as the trainer does: exiting with gloo's threads alive can abort
"""


def test_local_ranks_rendezvous_on_a_port_held_from_the_start():
    """The port the ranks meet on is bound before they start and stays bound: a process that
    tries to take it in between (as another job on the machine could) is refused, and the ranks
    still meet."""
    procs = launch_local(2, [sys.executable, "-c", RANK_THAT_WAITS], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ports = [int(p.stdout.readline()) for p in procs]  # both started; neither has bound anything
    try:
        with socket.socket() as s, pytest.raises(OSError) as taken:
            s.bind(("127.0.0.1", ports[0]))
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        for p in procs:
            p.stdin.close()  # the ranks read end-of-file and meet
        outputs = [p.stdout.read() for p in procs]
    assert ports[0] == ports[1] and [p.wait() for p in procs] == [0, 0] and outputs == ["2\n", "2\n"]


@pytest.mark.slow
def test_under_real_srun(tmp_path, slurm_cluster):
    script = "from cvtkit.dist import discover; d = discover(); print(d.rank, d.world_size, d.local_rank, d.launcher)"
    proc = subprocess.run(["srun", "--ntasks=2", "--cpus-per-task=1", "--mem=500M", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["0 2 0 slurm", "1 2 1 slurm"]
