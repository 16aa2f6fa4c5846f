"""Training through submitit (Slurm or its local executor), with submitit's own requeue.

submitit runs `TrainJob()(entry, argv)` in every task and, on its preemption / time-out signal
(USR2), calls `checkpoint()` on rank 0 from inside the signal handler. No collective may run there,
so the trainer's handler only sets a flag; at the next step boundary all ranks save together and
then hand the signal to submitit's handler, whose `checkpoint()` here merely resubmits the same
job: the run folder holds the checkpoint, and the restarted job resumes from it.

After any other end but 0, rank 0 decides as the job script does after srun (`requeue.py`: exit 2
never; a failure when the run made progress since the previous end, else within
`CVTKIT_RESTARTS_WITHOUT_PROGRESS`; one line either way, and a line of `RUN/requeues.jsonl`), and
requeues through that same handler of submitit (reused, not copied; it logs the requeue as a
preemption): `checkpoint()`, the dump of the job it returns, `scontrol requeue` (Slurm kills the
other tasks) or, with the local executor, the exit that makes submitit start the tasks again (its
controller restarts a job whose task exits 144). An exception is a bug: its traceback goes to the
log first. A stalled rank 0 decides in the watchdog's thread before it exits 76. Only rank 0
decides (one decision per end): a job whose rank 0 is killed outright, or frozen, ends without a
requeue (the sbatch path decides outside the tasks). The debug executor runs in this process: no
requeue, one line.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import UncompletedJobError

from . import watchdog
from .cli import finetune_main, pretrain_main
from .requeue import should_requeue
from .trainer import EXIT_REQUEUE

ENTRIES = {"pretrain": pretrain_main, "finetune": finetune_main}


class TrainJob(submitit.helpers.Checkpointable):
    """`entry`: "pretrain" or "finetune"; `argv`: the entry point's arguments."""

    def __call__(self, entry: str, argv: list[str]) -> int:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(submitit.JobEnvironment().num_tasks //
                                                      max(1, submitit.JobEnvironment().num_nodes)))
        self.decided = False  # whether this end's requeue was decided here (else `checkpoint` records it)
        watchdog.before_stall_exit(lambda code: self._end(code, argv))  # its exit cannot come back here
        try:
            rc = ENTRIES[entry](list(argv))
        except UncompletedJobError:  # submitit's handler declined to requeue after a preemption: its word
            raise
        except Exception:
            self._end(1, argv, before_requeue=traceback.print_exc)
            raise  # not requeued: submitit records the error and the traceback
        finally:
            watchdog.before_stall_exit(None)  # the trainer's watchdog has stopped
        if rc != 0:
            self._end(rc, argv)
        return rc

    def _end(self, rc: int, argv: list[str], before_requeue: Callable[[], object] | None = None) -> None:
        """On rank 0, the decision after an end with `rc` and, to requeue, submitit's handler of its
        preemption signal, which does not return (its exit, or `scontrol requeue` ending the job)."""
        env = submitit.JobEnvironment()
        if env.global_rank != 0:
            return
        signum = getattr(signal, f"SIG{env.USR_SIG}")
        handler = signal.getsignal(signum)  # the trainer has put submitit's back (StopSignals.restore)
        if getattr(handler, "__func__", None) is not SignalHandler.checkpoint_and_try_requeue:
            print(f"[cvtkit] no requeue: exit {rc}, and submitit's {env.cluster} executor cannot requeue",
                  flush=True)
            return
        self.decided = True
        if should_requeue(rc, argv):
            if before_requeue is not None:
                before_requeue()
            handler(signum, None)

    def checkpoint(self, entry: str, argv: list[str]) -> submitit.helpers.DelayedSubmission:
        """The job submitit requeues: the same one, without the faults of tests/fault_train.py's
        subclass (the run folder holds the state). Called by submitit's handler on rank 0, after a
        decision above or, on a preemption, directly: that end is recorded here."""
        if not getattr(self, "decided", False):
            should_requeue(EXIT_REQUEUE, argv)  # "saved after a preemption signal": always requeued
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


def submit_main(argv: list[str] | None = None) -> int:
    """`python slurm/submit.py` (`cvtkit-submit`): arguments after `--` go to the entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Submit pretraining or fine-tuning through submitit")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=int)
    p.add_argument("--partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], help="default: slurm when available")
    p.add_argument("--folder", default="submitit_logs/%j")
    p.add_argument("--wait", action="store_true", help="wait for the job and return its exit code")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        return 2
    entry_argv = ["--config", args.config] + (["--set", *args.overrides] if args.overrides else []) + extra
    job = submit(args.entry, entry_argv, args.folder, args.nodes, args.gpus_per_node, args.tasks_per_node,
                 args.partition, args.timeout_min, args.cpus_per_task, args.cluster, mem_gb=args.mem_gb)
    print(f"submitted job {job.job_id}; logs in {Path(str(job.paths.folder))}", flush=True)
    if not args.wait:
        return 0
    codes = job.results()
    code = max(int(c or 0) for c in codes)
    print(f"job {job.job_id} finished with {codes}")
    return code

