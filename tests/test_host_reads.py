"""No host reads in the step loop: between two log steps, cvtkit's own code reads nothing back from
the device (each read is a sync that stops the CPU from queueing the next step on a GPU).

Counted on CPU in a real run (two gloo ranks, DeepSpeed ZeRO-2 bf16, accumulation, EMA, Mixup,
CutMix and random erasing on the device, a loader worker) with a `TorchDispatchMode` that sees
every `aten._local_scalar_dense` (`.item()`, `float(t)`, `if t:`), attributed to the innermost
frame in cvtkit or DeepSpeed (tests/fault_train.py, CVTKIT_COUNT_HOST_READS). DeepSpeed's own
reads are printed, not asserted: they are DeepSpeed's; so is the seed torch's DataLoader draws
from its CPU generator at each epoch's start (a host tensor on any machine, no device sync)."""
import json

import pytest

from helpers import make_tiny_shards, train


@pytest.mark.slow
def test_no_device_reads_from_cvtkit_between_log_steps(tmp_path):
    shards = make_tiny_shards(tmp_path / "data")
    out = tmp_path / "reads.json"
    # 16 steps (64 samples / global batch 16, 4 epochs); micro batch 4 x 2 ranks: accumulation 2;
    # logs at steps 4, 8, 12, 16: three windows of four steps each; no save before the end.
    # The agreement's reads (checkpoint.signal_check_steps) fall on the log steps here.
    overrides = ["engine.micro_batch=4", "log.every_steps=4", "checkpoint.every_steps=0", "ema.decay=0.9",
                 "checkpoint.signal_check_steps=4",
                 "data.workers=1", "data.augment={kind: deit, re_prob: 0.25, mixup_alpha: 0.8, cutmix_alpha: 1.0}"]
    codes, text = train(tmp_path, shards, overrides, script="tests/fault_train.py",
                        env={"CVTKIT_COUNT_HOST_READS": str(out)})
    assert codes == [0, 0], text
    for rank in (0, 1):
        windows = json.loads((tmp_path / f"reads.json.rank{rank}").read_text())
        assert [(w["after_step"], w["read_at_step"]) for w in windows] == [(4, 8), (8, 12), (12, 16)]
        for w in windows:
            assert w["ops"] > 1000, w  # the mode saw the steps' work
            assert w["cvtkit"] == 0, w["where"]
        assert all(w["other"] == 0 for w in windows), windows
        print(f"rank {rank}: reads per window of 4 steps: DeepSpeed's {[w['deepspeed'] for w in windows]}, "
              f"DataLoader's seed {[w['host data'] for w in windows]}; where: {windows[-1]['where']}")
