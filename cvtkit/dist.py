"""Rank and world discovery, in one place, for every way a run is launched.

Precedence: torchrun / deepspeed launcher variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), then a
Slurm job step started by `srun` (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`), then a
single process. Slurm's variables come second because under `srun torchrun` `SLURM_PROCID` is the
node's task id, not the global rank; and the batch shell of an sbatch job (no `SLURM_STEP_ID`) is
not one of the tasks, whatever `SLURM_NTASKS` says.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from cvtkit.errors import CvtkitError


class LauncherError(CvtkitError, ValueError):
    """Launcher variables (Slurm, torchrun) that do not describe a valid set of ranks."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self, environ: dict | None = None) -> None:
        """Set the variables torch.distributed and DeepSpeed read (`env://` initialisation)."""
        env = os.environ if environ is None else environ
        env.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank),
                   WORLD_SIZE=str(self.world_size), MASTER_ADDR=self.master_addr,
                   MASTER_PORT=str(self.master_port))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[003-005,010],cpu1` -> `gpu003`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LauncherError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def default_port(job_id: str | None) -> int:
    """A port per job, so that two jobs sharing a node do not collide: 20000 + job id mod 20000."""
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LauncherError(f"{key}: expected an integer, got {env[key]!r}") from None


def discover(env: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port(env.get("SLURM_JOB_ID"))
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    if not 0 <= rank < world:
        raise LauncherError(f"rank {rank} is outside a world of {world} processes ({launcher} variables)")
    return DistEnv(rank, local, world, addr, port, launcher)


def hosted_rendezvous(host: str = "127.0.0.1"):
    """A rendezvous store for local ranks, bound to a port the system picks and held from that
    moment, as torchrun's agent hosts one: no port is chosen first and bound later, so no other
    process can take it in between. Returns the store (it serves as long as it is referenced) and
    the variables that make every rank's `env://` initialisation join it as a client."""
    from datetime import timedelta

    import torch.distributed as dist
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=30))
    return store, {"MASTER_ADDR": host, "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
                   "TORCHELASTIC_RESTART_COUNT": "0"}


def launch_local(nproc: int, cmd: list[str], env: Mapping[str, str] | None = None, **popen) -> list:
    """Start `nproc` ranks of `cmd` on this machine with the variables torchrun would export (the
    way srun starts one process per task); returns their `subprocess.Popen`s, which hold the
    ranks' rendezvous store (`hosted_rendezvous`) until the last of them is dropped. Unlike torchrun
    it passes each rank's exit status through, such as 75 for "saved, resume me"."""
    import subprocess

    store, rendezvous = hosted_rendezvous()
    base = {k: v for k, v in (os.environ if env is None else env).items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = []
    for rank in range(nproc):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), **rendezvous)
        procs.append(subprocess.Popen(cmd, env=rank_env, **popen))
        procs[-1].rendezvous_store = store
    return procs
