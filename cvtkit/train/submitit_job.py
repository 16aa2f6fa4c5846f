"""Training through submitit (Slurm or its local executor), with submitit's own requeue.

submitit runs `TrainJob()(entry, argv)` in every task and, on its preemption / time-out signal
(USR2), calls `checkpoint()` on rank 0 from inside the signal handler. No collective may run there,
so the trainer's handler only sets a flag; at the next step boundary all ranks save together and
then hand the signal to submitit's handler, whose `checkpoint()` here merely resubmits the same
job: the run folder holds the checkpoint, and the restarted job resumes from it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import submitit

ENTRIES = {"pretrain": "pretrain/train.py", "finetune": "finetune/finetune.py"}
REPO = Path(__file__).resolve().parents[2]


class TrainJob(submitit.helpers.Checkpointable):
    """`entry`: "pretrain" or "finetune"; `argv`: the entry point's arguments."""

    def __call__(self, entry: str, argv: list[str]) -> int:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(submitit.JobEnvironment().num_tasks //
                                                      max(1, submitit.JobEnvironment().num_nodes)))
        sys.path.insert(0, str(REPO))
        if entry == "finetune":
            from finetune.finetune import main
        else:
            from pretrain.train import main
        return main(list(argv))

    def checkpoint(self, entry: str, argv: list[str]) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainJob(), entry, argv)


def submit(entry: str, argv: list[str], folder: str, nodes: int, gpus_per_node: int,
           tasks_per_node: int | None = None, partition: str | None = None, timeout_min: int = 24 * 60,
           cpus_per_task: int = 8, cluster: str | None = None, signal_delay_s: int = 300,
           max_num_timeout: int = 30, mem_gb: int | None = None) -> submitit.Job:
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_num_timeout)
    params = dict(nodes=nodes, tasks_per_node=tasks_per_node or max(1, gpus_per_node),
                  cpus_per_task=cpus_per_task, timeout_min=timeout_min, name=f"cvtkit-{entry}")
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if mem_gb:
        params["mem_gb"] = mem_gb
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        if partition:
            params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor.submit(TrainJob(), entry, argv)
