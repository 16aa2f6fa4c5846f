"""Launch real training processes for the tests: N ranks as N processes with the variables a
launcher exports (as srun or torchrun would), on tiny learnable shards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_imagenet as fake
import torch

from cvtkit.dist import launch_local

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


def make_tiny_shards(root: Path, per_class=16, val_per_class=4, shard_samples=20,
                     synsets=fake.SYNSETS) -> str:
    from cvtkit.data.prep import PrepOptions, run
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


def dump_loaded(run_root: Path, shards: str, overrides: list[str] = (), nproc: int = 2) -> dict:
    """The live model state of a run built as training would build it, resuming from
    its run folder, without training a step (tests/fault_train.py)."""
    out = Path(run_root) / f"loaded-{time.monotonic_ns()}.pt"
    codes, text = train(run_root, shards, overrides, nproc, script="tests/fault_train.py",
                        env={"CVTKIT_DUMP_LOADED": str(out)})
    assert codes == [0] * nproc, text
    dump = torch.load(out, weights_only=True)
    out.unlink()
    return dump


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def signal_when_step(procs: list[subprocess.Popen], run_dir: Path, step: int, sig=signal.SIGUSR1,
                     timeout: float = 240) -> None:
    """Send `sig` to every rank once `metrics.jsonl` has a record at or past `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m.get("step", 0) >= step for m in metrics(run_dir)):
            for p in procs:
                p.send_signal(sig)
            return
        if any(p.poll() is not None for p in procs):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir}: step {step} not reached in {timeout} s")


def assert_same_model(live: dict, saved: dict) -> None:
    """The live model equals the consolidated fp32 state rounded to the live dtypes (bf16
    parameters; BatchNorm statistics stay fp32)."""
    assert live.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(live[name], value.to(live[name].dtype)), name


def job_env(**extra: str) -> dict:
    """The environment of an sbatch from a test: no SLURM_* of an enclosing job, this Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def job_field(job_id: str, field: str) -> str:
    """A field of `scontrol show job` (JobState, Restarts, ...); GONE once Slurm forgot the job."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "GONE")
