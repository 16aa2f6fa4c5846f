"""Why each start happened (`starts.jsonl`'s `reason`), from the requeue decisions recorded before
it (`cvtkit/train/requeue.py`, `requeues.jsonl`): driven through the functions the trainer and the
job scripts call, on a real run folder. The decisions of real jobs are in test_slurm_train.py."""
import json

from cvtkit.train.metrics import NEW_RUN, REQUEUES_FILE, RESUBMITTED, STARTS_FILE, record_start
from cvtkit.train.requeue import decide


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_start_says_why(tmp_path):
    """A first start, a requeue after a failure (its decision's reason), a start by hand with no end
    recorded since the one before, and a start after an end that was not requeued (budget spent)."""
    run = tmp_path / "run"
    run.mkdir()
    record_start(run, {"step": 0})
    requeued = decide(run, 1, budget=1)
    record_start(run, {"step": 0})
    record_start(run, {"step": 0})  # resubmitted by hand: nothing ended it in requeues.jsonl
    stopped = decide(run, 1, budget=1)  # the second end in a row without a checkpoint: not requeued
    record_start(run, {"step": 0})  # by hand again

    assert requeued[0] and not stopped[0]
    assert [e["reason"] for e in lines(run / REQUEUES_FILE)] == [requeued[1], stopped[1]]
    assert [s["reason"] for s in lines(run / STARTS_FILE)] == [NEW_RUN, requeued[1], RESUBMITTED, RESUBMITTED]


def test_a_start_after_requeued_ends_takes_the_last_reason(tmp_path):
    """Two requeued ends without a recorded start between them (the first restart failed before it
    got that far): the next start gives the reason of the last."""
    run = tmp_path / "run"
    run.mkdir()
    first, second = decide(run, 1, budget=2), decide(run, 76, budget=2)
    record_start(run, {"step": 0})
    assert first[0] and second[0] and first[1] != second[1]
    assert [s["reason"] for s in lines(run / STARTS_FILE)] == [second[1]]
