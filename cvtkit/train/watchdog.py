"""The stall watchdog: a thread on every rank that ends the process when the training loop makes no
progress for `guard.stall_timeout_s`, after writing where every thread was.

    dog = StallWatchdog(timeout_s, run_dir, rank)   # timeout_s 0: progress() does nothing else
    dog.start()
    ... dog.progress("step 12") ...     # a step, a validation batch, a phase of a save
    dog.stop()

A rank stuck outside a collective (a hung file read, a deadlocked loader worker, a dead GPU)
leaves the others waiting inside one until `engine.dist_timeout_s`, which then ends them with an
exception (exit 1: not requeued) and no word on where they were. The watchdog notices first, on
the stuck rank and on the waiting ones alike, and exits with a code the job script requeues.
Progress is only the loop's own: a step, a validation batch, each phase of a save (the
checkpointer calls back), so a long validation or save never trips it, and a save that hangs does.

The job script decides after the exit whether to requeue; submitit's job runs inside the process,
so it decides before the exit, in the watchdog's thread (`before_stall_exit`).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

STALLS_DIR = "stalls"  # in the run folder: one stack dump per stalled rank and stall
# The stalled rank's exit code; slurm/train_job.sh requeues on it as on EXIT_REQUEUE (75).
EXIT_STALL = 76
_before_exit: Callable[[int], None] | None = None


def before_stall_exit(hook: Callable[[int], None] | None) -> None:
    """`hook(EXIT_STALL)` runs in the watchdog's thread before a stalled process exits (the one hook of
    the process; None: none). It may end the process with SystemExit(code) (submitit's requeue
    does): the process then exits with that code."""
    global _before_exit
    _before_exit = hook


class StallWatchdog:
    """`timeout_s` seconds without `progress()` end the process with `EXIT_STALL`, after writing
    every thread's Python stack to `run_dir/stalls/rank<r>-<time>.txt` and one line to stderr;
    0 seconds: off (no thread)."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int):
        self.timeout_s = timeout_s
        self.stalls_dir = Path(run_dir) / STALLS_DIR
        self.rank = rank
        self.last = time.monotonic()
        self.what = "the start of training"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cvtkit-stall-watchdog", daemon=True)

    def start(self) -> None:
        self.progress("the start of training")
        if self.timeout_s > 0:
            self._thread.start()

    def progress(self, what: str) -> None:
        """Called by the loop on each unit of progress; `what` names it for the stall's line.
        Two assignments, no lock: the watcher only reads them."""
        self.what = what
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        # Checked a few times per timeout: the stall is noticed at most a quarter late.
        while not self._stopped.wait(self.timeout_s / 4):
            idle = time.monotonic() - self.last
            if idle >= self.timeout_s:
                self._stall(idle)

    def _stall(self, idle: float) -> None:
        self.stalls_dir.mkdir(parents=True, exist_ok=True)
        path = self.stalls_dir / f"rank{self.rank}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank}: no progress for {idle:.0f} s since {self.what}\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        print(f"[cvtkit] rank {self.rank}: no progress for {idle:.0f} s (guard.stall_timeout_s="
              f"{self.timeout_s:g}) since {self.what}; every thread's stack is in {path}; exiting with "
              f"{EXIT_STALL} to be requeued", file=sys.stderr, flush=True)
        # No cleanup can run: the main thread is the one that is stuck. In this thread only
        # os._exit ends the process, also after a hook's SystemExit or bug (whose traceback stays).
        code = EXIT_STALL
        try:
            if _before_exit is not None:
                _before_exit(EXIT_STALL)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else EXIT_STALL
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            os._exit(code)
