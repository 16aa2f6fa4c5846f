"""A run that heals itself (README "What survives what"): the stall watchdog and the loss-spike
rollback. Real training
processes (DeepSpeed over gloo, two CPU ranks, the tiny CvT); the faults are planted from the test
(SIGSTOP) or through tests/fault_train.py."""
import json
import re
import signal
import subprocess
import sys

import pytest
import torch

from cvtkit.checkpoint import consolidated_state_dict, tag_for
from cvtkit.train.metrics import EVENTS_FILE
from cvtkit.train.trace import TRACE_FILE
from cvtkit.train.watchdog import EXIT_STALL, STALLS_DIR

from helpers import REPO, make_tiny_shards, metrics, spawn, train, train_argv


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 training samples / global batch 16 = 4 steps per epoch (make_tiny_shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("guard"))


def wait_for_step(run, step: int, procs) -> None:
    """Until `metrics.jsonl` has a record at or past `step` (an event written by the run)."""
    import time
    while not any(m.get("step", 0) >= step for m in metrics(run)):
        assert all(p.poll() is None for p in procs), f"the run ended before step {step}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_frozen_rank_is_noticed_by_the_stall_watchdog(shards, tmp_path):
    """One rank of two is frozen (SIGSTOP) mid-training: the other, waiting in a collective,
    writes every thread's stack, naming the collective, to RUN/stalls/ and exits with EXIT_STALL
    (which the job script requeues), long before the collective timeout would end it with 1."""
    run = tmp_path / "tiny_cpu"
    stall_s, dist_timeout_s = 8, 120
    overrides = [f"guard.stall_timeout_s={stall_s}", f"engine.dist_timeout_s={dist_timeout_s}",
                 "schedule.epochs=50", "log.every_steps=1", "checkpoint.every_steps=2"]
    procs = spawn(2, train_argv(tmp_path, shards, overrides))
    try:
        wait_for_step(run, 3, procs)
        procs[1].send_signal(signal.SIGSTOP)
        # A collective timeout would end rank 0 with 1 after dist_timeout_s; the watchdog's code
        # says it was the watchdog, after stall_timeout_s.
        out, _ = procs[0].communicate(timeout=dist_timeout_s * 2)
    finally:  # also when rank 0 hangs on (no watchdog): no process outlives the test
        procs[1].send_signal(signal.SIGCONT)
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == EXIT_STALL, out
    dumps = list((run / STALLS_DIR).glob("rank0-*.txt"))
    assert len(dumps) == 1, out
    lines = [line for line in out.splitlines() if "no progress for" in line]
    assert len(lines) == 1 and str(dumps[0]) in lines[0] and f"exiting with {EXIT_STALL}" in lines[0], out
    stacks = dumps[0].read_text()
    # The main thread waits inside a torch.distributed collective.
    assert re.search(r'distributed_c10d\.py", line \d+ in (all_reduce|barrier|broadcast|all_gather\w*|'
                     r'reduce_scatter\w*)', stacks), stacks
    assert "cvtkit-stall-watchdog" in stacks or "_watch" in stacks, stacks


@pytest.mark.slow
def test_slow_validation_and_save_are_progress(shards, tmp_path):
    """Validation batches and the files of a save that each take 0.6 x guard.stall_timeout_s, 1.2 x
    in all per validation and per save on rank 0, do not trip the watchdog: each is progress."""
    stall_s = 8
    slow_s = 0.6 * stall_s
    overrides = [f"guard.stall_timeout_s={stall_s}", "schedule.epochs=1", "ema.decay=0.9",
                 "data.eval_batch=4", "checkpoint.every_steps=4"]
    codes, out = train(tmp_path, shards, overrides, script="tests/fault_train.py",
                       env={"CVTKIT_SLOW_SAVE_AND_VAL": str(slow_s)})
    assert codes == [0, 0], out
    assert "finished 4 steps" in out and "val top-1" in out
    assert not (tmp_path / "tiny_cpu" / STALLS_DIR).exists(), out


STALLED_PROCESS = """
import sys, threading
from pathlib import Path
from cvtkit.train import watchdog

def hook(code):
    Path(sys.argv[1], "hook").write_text(str(code))
    if sys.argv[2] == "exit":
        sys.exit(144)  # what submitit's requeue does with its local executor
    raise ValueError("a bug in the hook")

watchdog.before_stall_exit(hook)
watchdog.StallWatchdog(1, Path(sys.argv[1]), 0).start()
threading.Event().wait()  # the main thread is stuck: nothing sets the event
"""


@pytest.mark.parametrize("hook", ["exit", "bug"])
def test_a_stalled_process_runs_its_hook_before_it_exits(tmp_path, hook):
    """The hook submitit's job sets (`watchdog.before_stall_exit`: rank 0 decides and requeues)
    runs in the watchdog's thread while the main thread is stuck; its SystemExit code becomes the
    process's exit code; a bug in it keeps its traceback and the process still exits EXIT_STALL."""
    proc = subprocess.run([sys.executable, "-c", STALLED_PROCESS, str(tmp_path), hook], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert (tmp_path / "hook").read_text() == str(EXIT_STALL), proc.stderr
    assert "no progress for" in proc.stderr and list((tmp_path / STALLS_DIR).glob("rank0-*.txt")), proc.stderr
    if hook == "exit":
        assert proc.returncode == 144, proc.stderr
    else:
        assert proc.returncode == EXIT_STALL and "ValueError: a bug in the hook" in proc.stderr, proc.stderr


SPIKE = ["schedule.epochs=3", "checkpoint.every_steps=5", "log.every_steps=1", "guard.spike_factor=20",
         "guard.spike_window=3"]


@pytest.mark.slow
def test_a_loss_spike_rolls_back_and_skips_its_window(shards, tmp_path):
    """The loss of step 8 is planted 1e4 times too large (tests/fault_train.py): the run rolls back
    to the checkpoint of step 5, skips the batches of steps 6-8 (epoch 1's batches [1, 4): 4 steps
    per epoch), finishes, and records it, with the keys of the skipped steps as `data.trace` wrote
    them; its weights equal, to the bit, those of a run told from the start to skip those batches."""
    healed, skipped = tmp_path / "healed", tmp_path / "skipped"
    codes, out = train(healed, shards, SPIKE + ["data.trace=true"], script="tests/fault_train.py",
                       env={"CVTKIT_SPIKE_AT_STEP": "8"})
    assert codes == [0, 0], out
    assert "finished 12 steps" in out and "rolled back to" in out, out
    events = [json.loads(line) for line in (healed / "tiny_cpu" / EVENTS_FILE).read_text().splitlines()]
    assert len(events) == 1, events
    event = events[0]
    assert event["event"] == "rollback" and event["step"] == 8 and event["resumed_at"] == 5, event
    assert event["checkpoint"].endswith(tag_for(5)) and event["steps_skipped"] == 3, event
    assert event["loader_at"] == {"epoch": 1, "batches_done": 4}, event
    # The trace holds steps 1-8, then 6-12 taken again: the first lines of steps 6-8 are the undone ones.
    trace = [json.loads(line) for line in (healed / "tiny_cpu" / TRACE_FILE).read_text().splitlines()]
    assert [t["step"] for t in trace] == [*range(1, 9), *range(6, 13)]
    assert event["skipped_keys"] == [k for t in trace[5:8] for k in t["keys"]] and len(event["skipped_keys"]) == 48

    codes, out = train(skipped, shards, SPIKE[:-2], script="tests/fault_train.py",
                       env={"CVTKIT_SKIP_BATCHES": "1:1:4"})
    assert codes == [0, 0], out
    a = consolidated_state_dict(healed / "tiny_cpu" / "checkpoints" / tag_for(12))
    b = consolidated_state_dict(skipped / "tiny_cpu" / "checkpoints" / tag_for(12))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_too_many_spikes_stop_the_run_with_one_line(shards, tmp_path):
    """guard.max_rollbacks=0: the first spike stops the run, one line, exit 1."""
    codes, out = train(tmp_path, shards, SPIKE + ["guard.max_rollbacks=0"], script="tests/fault_train.py",
                       env={"CVTKIT_SPIKE_AT_STEP": "8"})
    assert codes == [1, 1], out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 8: loss" in errors[0] and "max_rollbacks=0" in errors[0], out
