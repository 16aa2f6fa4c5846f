"""What the tests share: tiny architectures, tiny learnable shards, real training processes (N
ranks as N processes with the variables a launcher exports, as srun or torchrun would), a real
local Slurm, and the rule for tests that cannot run on this machine."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fake_imagenet as fake
import pytest
import torch

from cvtkit.dist import launch_local

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
# Tiny architectures with the real structure: a few stages of width 16-64.
TINY_CVT = dict(dims=(16, 32, 64), heads=(1, 2, 2), depths=(1, 1, 2))
TINY_CEIT = dict(embed_dim=32, num_heads=2, depth=3, img_size=32)


def cannot_run(reason: str) -> None:
    """For a test that needs what this machine may lack (root, a local Slurm): it skips with the
    reason, except in CI (`CVTKIT_NO_SKIP=1`, set by .ci/run), where everything must run and a
    skip would hide a regression, so it fails."""
    if os.environ.get("CVTKIT_NO_SKIP"):
        pytest.fail(f"{reason} (CVTKIT_NO_SKIP is set: this test must run here)")
    pytest.skip(reason)



@functools.cache
def tool(name: str):
    """A script of tools/ (`gpu_check`, `gpu_wheels`) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def make_tiny_shards(root: Path, per_class=16, val_per_class=4, shard_samples=20,
                     synsets=fake.SYNSETS) -> str:
    """Shards of coloured classes a tiny model learns in a few steps. By default 4 synsets x 16 =
    64 training samples in 4 shards of at most 20, and 4 x 4 = 16 validation samples; with the tiny
    config's global batch 16 that is 64 / 16 = 4 steps per epoch, 16 steps for its 4 epochs."""
    from cvtkit.prep.pipeline import PrepOptions, run
    src = fake.make_colour_classes(root / "src", per_class=per_class, val_per_class=val_per_class,
                                   synsets=synsets)
    out = root / "shards"
    run(PrepOptions(source=str(src), out=str(out), shard_samples=shard_samples, workers=1), progress=False)
    return str(out)


def spawn(nproc: int, argv: list[str], script: str = "pretrain/train.py", cwd: Path = REPO,
          env: dict | None = None) -> list[subprocess.Popen]:
    """Start `nproc` ranks of `script` (stdout+stderr of each to a pipe)."""
    return launch_local(nproc, [sys.executable, str(REPO / script), *argv],
                        {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
                        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(procs: list[subprocess.Popen], timeout: float = 300) -> tuple[list[int], str]:
    """Return codes and rank 0's output (all ranks' output when one failed)."""
    outputs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    codes = [p.returncode for p in procs]
    text = outputs[0] if all(c == codes[0] for c in codes) else "\n".join(
        f"--- rank {i} (exit {c})\n{o}" for i, (c, o) in enumerate(zip(codes, outputs)))
    return codes, text


def train_argv(run_root: Path, shards: str, overrides: list[str] = (), config: Path = TINY_CONFIG) -> list[str]:
    return ["--config", str(config), "--set", f"data.train={shards}", f"data.val={shards}",
            f"out_dir={run_root}", *overrides]


def train(run_root: Path, shards: str, overrides: list[str] = (), nproc: int = 2,
          config: Path = TINY_CONFIG, timeout: float = 300, script: str = "pretrain/train.py",
          env: dict | None = None) -> tuple[list[int], str]:
    return wait(spawn(nproc, train_argv(run_root, shards, overrides, config), script=script, env=env), timeout)


def submit_with_faults(monkeypatch, run_root: Path, shards: str, overrides: list[str], faults: dict,
                       cluster: str):
    """A two-task submitit job (`cluster`: "slurm" or "local") of the tiny run whose first run has
    the `faults` of tests/fault_train.py (its FaultTrainJob; a requeue resubmits the plain job) and
    logs to `run_root/submitit/<job id>/`."""
    from cvtkit.train import submitit_job
    from fault_train import FaultTrainJob
    monkeypatch.setattr(submitit_job, "TrainJob", FaultTrainJob)
    for key, value in {**faults, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    # The tasks unpickle FaultTrainJob (from tests/) and import this checkout's cvtkit.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return submitit_job.submit("pretrain", train_argv(run_root, shards, overrides), str(run_root / "submitit" / "%j"),
                               nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, cluster=cluster,
                               mem_gb=4 if cluster == "slurm" else None)


def submitit_logs(run_root: Path) -> str:
    """Every task's log of the jobs `submit_with_faults` submitted, each under its name."""
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((run_root / "submitit").glob("*/*_log.*")))


def dump_loaded(run_root: Path, shards: str, overrides: list[str] = (), nproc: int = 2) -> dict:
    """The live model state of a run built as training would build it, resuming from
    its run folder, without training a step (tests/fault_train.py); `draws`: each rank's next
    random numbers (torch, numpy, python) after the resume."""
    out = Path(run_root) / f"loaded-{time.monotonic_ns()}.pt"
    codes, text = train(run_root, shards, overrides, nproc, script="tests/fault_train.py",
                        env={"CVTKIT_DUMP_LOADED": str(out)})
    assert codes == [0] * nproc, text
    dump = torch.load(out, weights_only=True)
    dump["draws"] = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(nproc)]
    for path in [out, *(Path(f"{out}.rank{r}") for r in range(nproc))]:
        path.unlink()
    return dump


def jsonl(path: Path) -> list[dict]:
    """The records of a run folder's `.jsonl` log (metrics, starts, requeues, events)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return jsonl(path) if path.is_file() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def assert_same_model(loaded: dict, saved: dict) -> None:
    """A model loaded back (`dump_loaded`) is the consolidated fp32 checkpoint `saved`: every
    parameter's fp32 master (DeepSpeed's accessor) equals the saved one to the bit, so a load from
    the bf16 working copies would not pass; the working copy is that master in its own dtype; the
    buffers (BatchNorm statistics, fp32) equal the saved ones to the bit."""
    state, masters = loaded["state"], loaded["masters"]
    assert state.keys() == saved.keys() and masters.keys() <= saved.keys()
    for name, value in saved.items():
        if name in masters:
            assert masters[name].dtype == value.dtype == torch.float32, name
            assert torch.equal(masters[name], value), f"{name}: fp32 master"
            assert torch.equal(state[name], value.to(state[name].dtype)), f"{name}: working copy"
        else:
            assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


def job_env(**extra: str) -> dict:
    """The environment of an sbatch from a test: no SLURM_* of an enclosing job, this Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def job_field(job_id: str, field: str) -> str:
    """A field of `scontrol show job` (JobState, Restarts, ...); GONE once Slurm forgot the job."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "GONE")


# ---------------------------------------------------------------- a real local Slurm

def _local_cluster_nodes(script: str) -> int | None:
    """Nodes of the running cluster that slurm/local_cluster.sh started, 0 for a cluster it did
    not start, None when no Slurm answers."""
    proc = subprocess.run([script, "status"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    found = re.match(r"local_cluster: (\d+) node", proc.stdout)
    return int(found.group(1)) if found else 0


def local_slurm(nodes: int):
    """A real Slurm of `nodes` nodes on this machine (slurm/local_cluster.sh), for a fixture to
    yield from: started if it is not running (switching from another node count: the cluster
    that ran before comes back afterwards), stopped afterwards if nothing ran before. Where Slurm
    cannot run, the test skips (fails in CI) and says why."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        cannot_run("Slurm is not installed (make setup installs slurmctld slurmd slurm-client munge)")
    script = str(REPO / "slurm" / "local_cluster.sh")
    before = _local_cluster_nodes(script)
    if before == nodes or (before == 0 and nodes == 1):  # a cluster of one's own serves one node
        yield
        return
    if before == 0:
        cannot_run(f"a Slurm that slurm/local_cluster.sh did not start is running; the {nodes}-node "
                    f"tests need the local one (stop yours first)")
    if os.geteuid() != 0:
        cannot_run("starting the local Slurm cluster needs root")
    if before is not None:  # switching kills every job: let the ones there finish first
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
            cannot_run(f"local Slurm ({n} node(s)) did not start: {proc.stderr.strip()}")

    try:
        start(nodes)
        yield
    finally:  # also after a failed start: leave no half-built cluster behind
        if before is None:
            subprocess.run([script, "stop"], capture_output=True, timeout=120)
        else:
            start(before)
