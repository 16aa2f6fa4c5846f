"""The real job scripts on a real two-node Slurm (slurm/local_cluster.sh start --nodes 2: node1
and node2 are network namespaces with their own address, hostname and slurmd, one CPU each): a
pretraining run with its ranks on both hosts that stops, requeues and resumes; a run that loses
its second node and comes back; the shard array spread over both nodes."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fake_imagenet as fake
from cvtkit.prep.pipeline import INFO_FILE
from cvtkit.checkpoint import complete_tags, tag_for

from helpers import REPO, TINY_CONFIG, job_env, job_field, make_tiny_shards, metrics

pytestmark = pytest.mark.slow

# One CPU task on each of the two nodes, instead of 4 nodes x 8 GPUs.
TWO_NODE_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=3G"]
STATE = Path("/var/spool/cvtkit-slurm")  # slurm/local_cluster.sh's state: the slurmd logs
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("multinode"))


def node_env() -> dict:
    # gloo between the nodes over the namespaces' interface, as env.sh names it on a real cluster
    return job_env(GLOO_SOCKET_IFNAME="cvtk0")


def wait_for(what: str, ready, timeout: float, log: Path, every: float = 1.0) -> float:
    """Poll `ready()`; returns the seconds it took, fails with the job log."""
    t0 = time.time()
    while not ready():
        if time.time() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{log.read_text() if log.exists() else ''}")
        time.sleep(every)
    return time.time() - t0


def pretrain(tmp_path: Path, shards: str, *overrides: str) -> str:
    """sbatch slurm/pretrain_w24.sh on both nodes; returns the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *TWO_NODE_JOB, f"--output={tmp_path}/job.log", "slurm/pretrain_w24.sh",
         "--config", str(TINY_CONFIG), "--set", f"data.train={shards}", f"data.val={shards}",
         f"out_dir={tmp_path}/runs", "log.every_steps=1", *overrides],
        cwd=REPO, capture_output=True, text=True, env=node_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def launched_on(job_id: str) -> set[str]:
    """The nodes whose slurmd launched a task of the job's first srun step."""
    return {log.name.split(".")[1] for log in STATE.glob("log/slurmd.node*.log")
            if f"launch task StepId={job_id}.0 " in log.read_text()}


def starts(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]


def test_two_node_run_stops_requeues_and_resumes(shards, tmp_path, slurm_two_nodes):
    """Rank 0 on node1, rank 1 on node2 (gloo over TCP between the namespaces); the run stops at
    checkpoint.stop_at_step and exits 75, the job requeues itself (same id, restart 1), resumes from
    that checkpoint on both nodes again and finishes."""
    run, log = tmp_path / "runs/tiny_cpu", tmp_path / "job.log"
    job = pretrain(tmp_path, shards, "schedule.epochs=2", "checkpoint.stop_at_step=3")
    wait_for("the job to finish", lambda: job_field(job, "JobState") in FINISHED, 240, log)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text
    assert "on node[1-2]: 2 tasks, master node1:" in text and "x 2 ranks; 8 steps" in text
    assert "stopped at checkpoint.stop_at_step at step 3/8" in text and "requeueing job" in text
    assert "(restart 1)" in text and "resumed from" in text and "finished 8 steps" in text
    assert launched_on(job) == {"node1", "node2"}
    assert [(s["slurm_restart_count"], s["step"], s["world_size"]) for s in starts(run)] == \
        [(None, 0, 2), ("1", 3, 2)]
    assert sorted({m["step"] for m in metrics(run) if "train/loss" in m}) == list(range(1, 9))
    assert complete_tags(run / "checkpoints")[-1] == tag_for(8)


@pytest.mark.parametrize("how", ["crash", "kill"])
def test_lost_node_ends_the_run_and_the_requeued_job_resumes(shards, tmp_path, slurm_two_nodes, how):
    """node2 is lost mid-run: everything in its namespace (slurmd, slurmstepd, rank 1) is killed,
    after its link is cut ("crash": nothing more arrives from it, rank 0 waits in a collective)
    or with the link up ("kill": rank 0 fails at once on the reset connection, and srun must still
    not end the job before Slurm knows why). Either way Slurm declares node2 down within
    SlurmdTimeout (engine.dist_timeout_s bounds rank 0's wait in any case), ends the job as
    NODE_FAIL and, the job being --requeue, requeues it; once node2 is back the job resumes from
    the last complete checkpoint and finishes with every step logged."""
    run, log = tmp_path / "runs/tiny_cpu", tmp_path / "job.log"
    job = pretrain(tmp_path, shards, "schedule.epochs=6", "checkpoint.every_steps=2",
                   "engine.dist_timeout_s=20")
    wait_for("step 5", lambda: any(m.get("step", 0) >= 5 for m in metrics(run)), 180, log, every=0.2)
    if how == "crash":
        subprocess.run(["ip", "link", "set", "cvtk-h2", "down"], check=True)
    pids = subprocess.run(["ip", "netns", "pids", "cvtk-node2"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert pids, "nothing ran in node2's namespace"
    subprocess.run(["kill", "-KILL", *pids], check=True)
    lost = wait_for("the job to leave node2",
                    lambda: job_field(job, "JobState") not in ("RUNNING", "COMPLETING"), 120, log)
    # Read only now: rank 0 has ended with the job (a save whose every part was written before the
    # kill may still have got its COMPLETE from rank 0 after it), and the requeued job cannot start
    # again before node2 is back.
    saved = complete_tags(run / "checkpoints")
    assert saved and saved[-1] >= tag_for(4)
    assert job_field(job, "JobState") == "PENDING" and job_field(job, "Restarts") == "1", \
        log.read_text() + (STATE / "log/slurmctld.log").read_text()[-5000:]
    assert "Not responding" in subprocess.run(["sinfo", "-R", "-h"], capture_output=True, text=True).stdout
    assert "Node failure on node2" in log.read_text()

    back = subprocess.run([str(REPO / "slurm/local_cluster.sh"), "start", "--nodes", "2"], capture_output=True,
                          text=True, timeout=120)  # node2 returns: link up, slurmd restarted
    assert back.returncode == 0, back.stdout + back.stderr
    wait_for("the requeued job to finish", lambda: job_field(job, "JobState") in FINISHED, 240, log)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text
    assert "(restart 1)" in text and "finished 24 steps" in text
    assert f"resumed from {run / 'checkpoints' / saved[-1]}" in text
    assert [(s["slurm_restart_count"], s["world_size"]) for s in starts(run)] == [(None, 2), ("1", 2)]
    assert sorted({m["step"] for m in metrics(run) if "train/loss" in m}) == list(range(1, 25))
    assert complete_tags(run / "checkpoints")[-1] == tag_for(24)
    print(f"{how}: job {job} left the lost node after {lost:.0f} s")


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_make_shards_array_across_both_nodes(tmp_path, slurm_two_nodes):
    src = fake.make_folder22k(tmp_path / "src", per_class=8)
    common = ["--source", str(src), "--shard-samples", "3", "--holdout", "2"]
    subprocess.run([sys.executable, str(REPO / "data_prep/make_shards.py"), *common,
                    "--out", str(tmp_path / "whole"), "--quiet", "--workers", "1"], check=True)
    proc = subprocess.run(["sbatch", "--wait", "--array=0-3", "--cpus-per-task=1", "--mem=1G",
                           f"--output={tmp_path}/task-%a-%N.log", "slurm/make_shards.sh", *common,
                           "--out", str(tmp_path / "array")],
                          cwd=REPO, capture_output=True, text=True, timeout=240, env=node_env())
    logs = sorted(tmp_path.glob("task-*.log"))
    assert proc.returncode == 0, proc.stderr + "".join(p.read_text() for p in logs)
    assert len(logs) == 4 and {p.stem.split("-")[2] for p in logs} == {"node1", "node2"}
    assert shard_bytes(tmp_path / "array") == shard_bytes(tmp_path / "whole")
    assert json.loads((tmp_path / "array" / INFO_FILE).read_text()) == \
        json.loads((tmp_path / "whole" / INFO_FILE).read_text())
