"""Whether a job that ended should run again: the one rule for the job scripts (slurm/train_job.sh,
after the training processes exit) and for submitit's job (`submitit_job.TrainJob`, on rank 0),
with a budget for restarts that make no progress.

    python -m cvtkit.train.requeue RC --config FILE [--set ...]   # exit 0: requeue, 1: do not
    should_requeue(rc, entry_argv)                                 # the same, with its line

- 0: the run is done; 2: bad input (a rerun fails the same way): never requeued.
- 75 (`EXIT_REQUEUE`, saved after a preemption signal): always requeued.
- anything else (a crash, a killed rank, 76 from the stall watchdog): requeued when the run made
  progress since the previous end (a newer complete checkpoint); otherwise only
  `CVTKIT_RESTARTS_WITHOUT_PROGRESS` times (default 2) in a row, so that a run that fails at start
  does not loop forever; then one line says why and what to look at.

Each end and the decision are a line of `RUN/requeues.jsonl`; the budget is counted from it, and
the next start's line of `RUN/starts.jsonl` takes its reason (`metrics.start_reason`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cvtkit.checkpoint import TAG_RE, latest_complete
from cvtkit.config_loader import add_config_args, load_config

from .metrics import REQUEUES_FILE, STARTS_FILE, read_jsonl
from .run_config import RunConfig
from .trainer import EXIT_REQUEUE

BUDGET_ENV = "CVTKIT_RESTARTS_WITHOUT_PROGRESS"
DEFAULT_BUDGET = 2


def _step(tag: str | None) -> int:
    return -1 if tag is None else int(TAG_RE.match(tag).group(1))


def decide(run_dir: Path, rc: int, budget: int) -> tuple[bool, str]:
    """(requeue?, the reason), recorded in `run_dir/requeues.jsonl`."""
    path = run_dir / REQUEUES_FILE
    records = read_jsonl(path)
    newest = _step(latest_complete(run_dir / "checkpoints"))
    before = records[-1]["checkpoint_step"] if records else _last_start_step(run_dir)
    progress = newest > before
    idle = 0 if progress else next((i for i, r in enumerate(reversed(records)) if r["progress"]), len(records)) + 1
    if rc == 0:
        requeue, why = False, "finished"
    elif rc == 2:
        requeue, why = False, "bad input (exit 2): a rerun would fail the same way; see the job's log"
    elif rc == EXIT_REQUEUE:
        requeue, why = True, "saved after a preemption signal"
    elif progress:
        requeue, why = True, f"exit {rc} after progress (checkpoint of step {newest})"
    elif idle <= budget:
        requeue, why = True, f"exit {rc} without progress, restart {idle} of {BUDGET_ENV}={budget}"
    else:
        requeue, why = False, (f"exit {rc}, and {idle} ends in a row without a new checkpoint "
                               f"({BUDGET_ENV}={budget}): not requeueing; look at the job's log and "
                               f"{run_dir / 'stalls'} for where it fails")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), "rc": rc, "checkpoint_step": newest, "progress": progress,
                            "requeue": requeue, "reason": why, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}) + "\n")
    return requeue, why


def _last_start_step(run_dir: Path) -> int:
    """Before any recorded end: the step the last start resumed from (-1: none recorded)."""
    starts = read_jsonl(run_dir / STARTS_FILE)
    return starts[-1]["step"] if starts else -1


def budget_from_env() -> int:
    return int(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET))


def should_requeue(rc: int, argv: list[str]) -> bool:
    """The decision after an end with `rc` of the run that the entry point's arguments `argv`
    (`--config FILE --set ...`; others, such as `--pretrained`, do not matter) name, and its line."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_args(parser)
    args, _ = parser.parse_known_args(argv)
    if rc in (0, 2):  # done, or bad input (the config itself, maybe): nothing to look at
        print(f"[cvtkit] no requeue: exit {rc}", flush=True)
        return False
    cfg = load_config(RunConfig, args.config, args.overrides)
    requeue, why = decide(Path(cfg.out_dir) / cfg.name, rc, budget_from_env())
    print(f"[cvtkit] {'requeue' if requeue else 'no requeue'}: {why}", flush=True)
    return requeue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Whether the job should be requeued (exit 0) or not (1)")
    parser.add_argument("rc", type=int, help="the exit code of the training processes")
    add_config_args(parser)  # for --help and the usage errors; should_requeue reads them again
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)  # the entry point's other arguments (--pretrained) do not matter
    return 0 if should_requeue(args.rc, argv) else 1


if __name__ == "__main__":
    sys.exit(main())
