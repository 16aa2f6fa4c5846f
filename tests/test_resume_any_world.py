"""Resume on any number of ranks, sample-exact (issue #26), with real DeepSpeed over gloo and a
tiny CvT: a run stopped on 4 ranks, resumed on 2, stopped, resumed on 1 (the micro batch pinned,
accumulation taking the difference) trains on the very micro-batches of an uninterrupted 4-rank
run, step by step (`data.trace`), with the same losses and final weights up to the order of the
fp32 gradient reduction; so does a resume on 2 ranks with other `data.workers`."""
import json
import shutil

import pytest

from cvtkit.checkpoint import complete_tags, consolidated_state_dict
from cvtkit.train.trainer import EXIT_REQUEUE
from helpers import make_tiny_shards, train, train_losses

MICRO = 4
# 64 samples / global batch 16 = 4 steps per epoch; 3 epochs; a line of metrics per step.
RUN = ["engine.micro_batch=4", "data.trace=true", "schedule.epochs=3", "log.every_steps=1",
       "checkpoint.every_steps=0", "model.drop_path_rate=0.0"]
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("any_world"))


def trace(run) -> list[list[frozenset]]:
    """Each step's micro-batches as key sets, in step order (a rewritten step counted once)."""
    lines = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1))
    return [[frozenset(line["keys"][i:i + MICRO]) for i in range(0, len(line["keys"]), MICRO)] for line in lines]


# BatchNorm's running estimates move once per forward (momentum), so they follow the number of
# micro-batches per rank, not only the samples: compared are the fp32 master weights.
RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def final_masters(run) -> dict:
    ckpt = run / "checkpoints"
    state = consolidated_state_dict(ckpt / complete_tags(ckpt)[-1])
    return {k: v for k, v in state.items() if not k.endswith(RUNNING)}


def assert_same_training(run, reference):
    steps = trace(reference)
    assert len(steps) == 12 and all(len(step) == 4 and all(len(b) == MICRO for b in step) for step in steps)
    assert trace(run) == steps
    theirs, ours = train_losses(reference), train_losses(run)
    assert sorted(ours) == sorted(theirs) == list(range(1, 13))
    worst = max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in theirs)
    print(f"largest relative loss difference: {worst:.2e}")
    assert worst <= LOSS_RTOL
    a, b = final_masters(run), final_masters(reference)
    assert a.keys() == b.keys() and len(b) > 10
    worst = max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)
    print(f"largest relative master difference: {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.slow
def test_resumed_on_fewer_ranks_trains_on_the_same_micro_batches(shards, tmp_path):
    reference = tmp_path / "reference"
    codes, out = train(reference, shards, RUN, nproc=4)
    assert codes == [0] * 4, out
    reference = reference / "tiny_cpu"

    shrunk = tmp_path / "shrunk"
    codes, out = train(shrunk, shards, [*RUN, "checkpoint.stop_at_step=3"], nproc=4)  # mid-epoch
    assert codes == [EXIT_REQUEUE] * 4, out
    other_workers = tmp_path / "workers"
    shutil.copytree(shrunk, other_workers)
    codes, out = train(shrunk, shards, [*RUN, "checkpoint.stop_at_step=7"], nproc=2)  # one before the boundary
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "micro batch 4 x accumulation 2 x 2 ranks" in out and "at step 3" in out
    codes, out = train(shrunk, shards, RUN, nproc=1)
    assert codes == [0], out
    assert "micro batch 4 x accumulation 4 x 1 ranks" in out and "at step 7" in out
    assert_same_training(shrunk / "tiny_cpu", reference)

    codes, out = train(other_workers, shards, [*RUN, "data.workers=2"], nproc=2)
    assert codes == [0, 0], out
    assert_same_training(other_workers / "tiny_cpu", reference)


@pytest.mark.slow
def test_resumed_at_an_epoch_boundary_on_another_world_size(shards, tmp_path):
    """Stopped after the last step of epoch 1 on 2 ranks, resumed on 1: epoch 2 starts with the
    batches an uninterrupted 2-rank run gets."""
    reference = tmp_path / "reference"
    codes, out = train(reference, shards, [*RUN, "schedule.epochs=2"], nproc=2)
    assert codes == [0, 0], out
    resumed = tmp_path / "resumed"
    codes, out = train(resumed, shards, [*RUN, "schedule.epochs=2", "checkpoint.stop_at_step=4"], nproc=2)
    assert codes == [EXIT_REQUEUE] * 2, out
    codes, out = train(resumed, shards, [*RUN, "schedule.epochs=2"], nproc=1)
    assert codes == [0], out
    assert trace(resumed / "tiny_cpu") == trace(reference / "tiny_cpu") and len(trace(resumed / "tiny_cpu")) == 8
