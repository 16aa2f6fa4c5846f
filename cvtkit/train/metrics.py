"""What a run reports: tensorboard scalars and `metrics.jsonl` (rank 0), MFU, memory."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets
# (docs/recipes.md#peak-figures-used-for-mfu), matched against the device name in this order:
# "H100 PCIe" before "H100". Training's MFU and the benchmark's both divide by these.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
                   ("L40S", 362e12), ("A10G", 70e12))


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (`torch.cuda.get_device_name`); None where unknown."""
    return next((v for key, v in PEAK_BF16_FLOPS if key in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """MFU's denominator for `device`; None on CPU and on GPUs not in the table (MFU is left out)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


EVENTS_FILE = "events.jsonl"  # in the run folder, beside metrics.jsonl
METRICS_FILE = "metrics.jsonl"
STARTS_FILE = "starts.jsonl"  # one line per start of a run, with its reason
REQUEUES_FILE = "requeues.jsonl"  # one line per end of a job's training and the decision to requeue it
# The reasons of a start that no requeue decision explains (`start_reason`).
NEW_RUN, RESUBMITTED = "new run", "resubmitted"


class RunLog:
    """Scalars to tensorboard and one JSON line per record in `metrics.jsonl`; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.path = run_dir / METRICS_FILE
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def event(self, kind: str, fields: dict) -> None:
        """One line of `events.jsonl` (what the run did by itself: a rollback, non-finite steps)
        and its numeric fields as `guard/<kind>/<field>` scalars at `fields["step"]`."""
        if not self.enabled:
            return
        with open(self.path.with_name(EVENTS_FILE), "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
        for key, value in fields.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"guard/{kind}/{key}", value, fields["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Throughput:
    """Images/s, data-wait fraction and step time over a logging window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.steps, self.data_wait = time.perf_counter(), 0, 0, 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.steps += 1
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_s": self.images / elapsed, "step_s": elapsed / max(self.steps, 1),
                "data_wait_fraction": self.data_wait / elapsed}


def record_start(run_dir: Path, fields: dict) -> None:
    """A line of `starts.jsonl`: `fields`, why (`start_reason`), when, from which commit, and Slurm's
    job and restart."""
    record = {"start": time.time(), **fields, "reason": start_reason(run_dir),
              "git_commit": git_commit(Path(__file__).resolve().parents[2]),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
    with open(Path(run_dir) / STARTS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def start_reason(run_dir: Path) -> str:
    """Why the run starts now: the reason of the requeue decision (`requeue.py`) recorded since the
    previous start, else NEW_RUN for the first start and RESUBMITTED for a later one (by hand, or
    after an end that was not requeued). Ends and starts are ordered by their times: an end is
    recorded seconds to minutes after its start, far above the clock skew between two nodes."""
    starts, ends = read_jsonl(Path(run_dir) / STARTS_FILE), read_jsonl(Path(run_dir) / REQUEUES_FILE)
    if ends and ends[-1]["requeue"] and (not starts or ends[-1]["time"] > starts[-1]["start"]):
        return ends[-1]["reason"]
    return RESUBMITTED if starts or ends else NEW_RUN


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file of the run folder; none when it does not exist."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
