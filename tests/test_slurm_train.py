"""The real job scripts on a real (single-node) Slurm: sbatch slurm/pretrain_w24.sh with a tiny
override, preemption -> save -> requeue -> resume, and the submitit path."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvtkit.checkpoint import complete_tags, tag_for

from cvtkit.train.metrics import NEW_RUN, REQUEUES_FILE, STARTS_FILE

from helpers import (REPO, TINY_CONFIG, jsonl, job_env, job_field, make_tiny_shards, metrics, submit_with_faults,
                     submitit_logs)

# Two CPU tasks on one node instead of 4 nodes x 8 GPUs; everything else is the script's own.
SMALL_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=4G"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("slurm_train"))


@pytest.mark.slow
def test_sbatch_pretrain_w24_then_finetune_w24_384(shards, tmp_path, slurm_cluster):
    env = job_env()
    env["CVTKIT_SET"] = "schedule.epochs=1"  # overrides from the environment, then the arguments
    proc = subprocess.run(["sbatch", "--wait", *SMALL_JOB, f"--output={tmp_path}/job.log", "slurm/pretrain_w24.sh",
                           "--config", str(TINY_CONFIG), "--set", f"data.train={shards}", f"data.val={shards}",
                           f"out_dir={tmp_path}/runs"],
                          cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    log = (tmp_path / "job.log").read_text()
    assert proc.returncode == 0, proc.stderr + log
    assert "2 tasks, master" in log and "micro batch 8 x accumulation 1 x 2 ranks; 4 steps" in log
    assert "finished 4 steps" in log
    assert complete_tags(tmp_path / "runs/tiny_cpu/checkpoints") == [tag_for(4)]

    # ... and the fine-tuning job script starts from that run
    proc = subprocess.run(["sbatch", "--wait", *SMALL_JOB, f"--output={tmp_path}/ft.log", "slurm/finetune_w24_384.sh",
                           "--config", str(REPO / "configs/finetune/tiny_cpu.yaml"),
                           "--pretrained", f"{tmp_path}/runs/tiny_cpu", "--set", f"data.train={shards}",
                           f"data.val={shards}", f"out_dir={tmp_path}/runs"],
                          cwd=REPO, capture_output=True, text=True, timeout=400, env=job_env())
    log = (tmp_path / "ft.log").read_text()
    assert proc.returncode == 0, proc.stderr + log
    assert "4/4 head rows copied by synset" in log and "finished 8 steps" in log


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes(shards, tmp_path, slurm_cluster):
    """USR1 to every task (as --signal sends before the time limit): all ranks save at one step,
    the job requeues itself (same id, SLURM_RESTART_COUNT=1), resumes and finishes."""
    run = tmp_path / "runs/tiny_cpu"
    job_id = subprocess.run(
        ["sbatch", "--parsable", *SMALL_JOB, f"--output={tmp_path}/job.log", "slurm/pretrain_w24.sh",
         "--config", str(TINY_CONFIG), "--set", f"data.train={shards}", f"data.val={shards}",
         f"out_dir={tmp_path}/runs", "schedule.epochs=6", "log.every_steps=1", "checkpoint.every_steps=0"],
        cwd=REPO, capture_output=True, text=True, check=True, env=job_env()).stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while not any(m.get("step", 0) >= 3 for m in metrics(run)):
        assert time.time() < deadline and job_field(job_id, "JobState") in ("PENDING", "RUNNING"), \
            (tmp_path / "job.log").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    deadline = time.time() + 600
    while job_field(job_id, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.time() < deadline, "the requeued job did not finish"
        time.sleep(2)
    log = (tmp_path / "job.log").read_text()
    assert job_field(job_id, "JobState") == "COMPLETED", log
    assert "stopped by signal" in log and "requeueing job" in log and "(restart 1)" in log
    starts = jsonl(run / STARTS_FILE)
    assert [s["slurm_restart_count"] for s in starts] == [None, "1"]
    assert starts[1]["step"] > 0  # resumed, not restarted
    assert sorted({m["step"] for m in metrics(run) if "train/loss" in m}) == list(range(1, 25))
    assert complete_tags(run / "checkpoints")[-1] == tag_for(24)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["slurm", "local"])
def test_submitit_runs_to_completion(shards, tmp_path, slurm_cluster, cluster):
    proc = subprocess.run(
        [sys.executable, "slurm/submit.py", "--cluster", cluster, "--config", str(TINY_CONFIG),
         "--tasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--mem-gb", "4",
         "--folder", f"{tmp_path}/submitit/%j", "--wait", "--set", f"data.train={shards}",
         f"data.val={shards}", f"out_dir={tmp_path}/runs", "schedule.epochs=1"],
        cwd=REPO, capture_output=True, text=True, timeout=400, env=job_env())
    logs = "".join(p.read_text() for p in tmp_path.glob("submitit/*/*_0_log.*"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "finished with [0, 0]" in proc.stdout
    assert "finished 4 steps" in logs
    assert complete_tags(tmp_path / "runs/tiny_cpu/checkpoints") == [tag_for(4)]


@pytest.mark.slow
def test_a_submitit_job_with_a_killed_rank_requeues_and_finishes(shards, tmp_path, slurm_cluster, monkeypatch):
    """submitit on Slurm, kill -9 of rank 1 once step 6 is done (past the checkpoint of step 4):
    rank 0 decides as the job script would and requeues through submitit's handler (`scontrol
    requeue`: Restarts=1); the job resumes from step 4 and finishes; both files say why."""
    job = submit_with_faults(monkeypatch, tmp_path, shards, ["checkpoint.every_steps=4", "engine.dist_timeout_s=30"],
                             {"CVTKIT_KILL_RANK_AT_STEP": "6:1"}, cluster="slurm")
    _wait_for_end(job.job_id, tmp_path / "submitit" / job.job_id / f"{job.job_id}_0_log.out")
    logs = submitit_logs(tmp_path)
    assert job_field(job.job_id, "JobState") == "COMPLETED" and job_field(job.job_id, "Restarts") == "1", logs
    assert job.results() == [0, 0], logs
    run = tmp_path / "tiny_cpu"
    ends = jsonl(run / REQUEUES_FILE)
    assert len(ends) == 1 and ends[0]["requeue"] and ends[0]["checkpoint_step"] == 4, ends
    assert f"[cvtkit] requeue: {ends[0]['reason']}" in logs and "finished 16 steps" in logs, logs
    starts = jsonl(run / STARTS_FILE)
    assert [(s["step"], s["reason"], s["slurm_restart_count"]) for s in starts] == \
        [(0, NEW_RUN, None), (4, ends[0]["reason"], "1")], starts


def test_job_script_outside_slurm_says_so(tmp_path):
    env = job_env()
    proc = subprocess.run(["bash", "slurm/pretrain_w24.sh"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "run this through sbatch" in proc.stderr


def _wait_for_end(job_id: str, log, timeout: float = 900) -> None:
    """Until Slurm reports the job over (local_cluster.sh lets a requeued job start again after 11 s)."""
    deadline = time.time() + timeout
    while job_field(job_id, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.time() < deadline, f"job {job_id} did not end:\n{log.read_text() if log.exists() else ''}"
        time.sleep(2)


def _tiny_job_at_step_6(shards, tmp_path, override: str, **env: str) -> tuple[str, Path, Path]:
    """sbatch the tiny run (4 epochs, a checkpoint every 4 steps) with `override` and `env`; returns
    its job id, run folder and log once step 6 is logged."""
    run, log = tmp_path / "runs/tiny_cpu", tmp_path / "job.log"
    job_id = subprocess.run(
        ["sbatch", "--parsable", *SMALL_JOB, f"--output={log}", "slurm/pretrain_w24.sh",
         "--config", str(TINY_CONFIG), "--set", f"data.train={shards}", f"data.val={shards}",
         f"out_dir={tmp_path}/runs", "schedule.epochs=4", "log.every_steps=1", "checkpoint.every_steps=4",
         override],
        cwd=REPO, capture_output=True, text=True, check=True, env=job_env(**env)).stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while not any(m.get("step", 0) >= 6 for m in metrics(run)):
        assert time.time() < deadline and job_field(job_id, "JobState") in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.5)
    return job_id, run, log


@pytest.mark.slow
def test_a_crashed_job_requeues_after_progress(shards, tmp_path, slurm_cluster):
    """kill -9 of one rank after a periodic checkpoint: the job requeues itself (Restarts=1),
    resumes from the checkpoint and finishes; requeues.jsonl says why."""
    import os
    import signal
    job_id, run, log = _tiny_job_at_step_6(shards, tmp_path, "engine.dist_timeout_s=30")
    ranks = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}/runs"], capture_output=True, text=True).stdout.split()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    _wait_for_end(job_id, log)
    text = log.read_text()
    assert job_field(job_id, "JobState") == "COMPLETED" and job_field(job_id, "Restarts") == "1", text
    assert "requeueing job" in text and "finished 16 steps" in text, text
    ends = jsonl(run / REQUEUES_FILE)
    assert len(ends) == 1 and ends[0]["requeue"] and ends[0]["progress"] and ends[0]["checkpoint_step"] >= 4, ends
    starts = jsonl(run / STARTS_FILE)
    assert [s["slurm_restart_count"] for s in starts] == [None, "1"] and starts[1]["step"] >= 4


@pytest.mark.slow
def test_a_job_failing_before_any_checkpoint_stops_after_its_budget(shards, tmp_path, slurm_cluster):
    """Every start fails before any checkpoint (an invalid MASTER_PORT): with
    CVTKIT_RESTARTS_WITHOUT_PROGRESS=1 the job runs twice, then ends with the line saying why."""
    run = tmp_path / "runs/tiny_cpu"
    log = tmp_path / "job.log"
    job_id = subprocess.run(
        ["sbatch", "--parsable", *SMALL_JOB, f"--output={log}", "slurm/pretrain_w24.sh",
         "--config", str(TINY_CONFIG), "--set", f"data.train={shards}", f"data.val={shards}",
         f"out_dir={tmp_path}/runs"],
        cwd=REPO, capture_output=True, text=True, check=True,
        env=job_env(MASTER_PORT="99999", CVTKIT_RESTARTS_WITHOUT_PROGRESS="1")).stdout.strip().split(";")[0]
    _wait_for_end(job_id, log)
    text = log.read_text()
    assert job_field(job_id, "Restarts") in ("1", "GONE"), text
    ends = jsonl(run / REQUEUES_FILE)
    assert [e["requeue"] for e in ends] == [True, False] and not any(e["progress"] for e in ends), ends
    lines = [line for line in text.splitlines() if "no requeue:" in line]
    assert len(lines) == 1 and "2 ends in a row without a new checkpoint" in lines[0], text


@pytest.mark.slow
def test_a_frozen_rank_job_requeues_and_resumes(shards, tmp_path, slurm_cluster):
    """One rank frozen (SIGSTOP) after a periodic checkpoint: the other's stall watchdog writes its
    stacks and exits 76, srun kills the frozen one (CVTKIT_SRUN_WAIT_S later), the job requeues itself, resumes from the last
    checkpoint and finishes."""
    import os
    import signal
    job_id, run, log = _tiny_job_at_step_6(shards, tmp_path, "guard.stall_timeout_s=10", CVTKIT_SRUN_WAIT_S="10")
    frozen = int(subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}/runs"], capture_output=True,
                                text=True).stdout.split()[-1])
    os.kill(frozen, signal.SIGSTOP)
    try:
        _wait_for_end(job_id, log)
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
    text = log.read_text()
    assert job_field(job_id, "JobState") == "COMPLETED" and job_field(job_id, "Restarts") == "1", text
    assert "no progress for" in text and "requeueing job" in text and "finished 16 steps" in text, text
    assert list((run / "stalls").glob("rank*.txt")), text
    starts = jsonl(run / STARTS_FILE)
    assert [s["slurm_restart_count"] for s in starts] == [None, "1"] and starts[1]["step"] >= 4
