"""What only shows with many ranks, with real DeepSpeed over gloo (2 CPU processes, tiny models):
the dtypes gradients are reduced in, the EMA of the fp32 masters, the per-GPU batch across a change
of world size, BatchNorm statistics across ranks, and the guards under ZeRO-0 and ZeRO-3."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvtkit.checkpoint import COMPLETE, complete_tags, tag_for
from cvtkit.config_loader import ConfigError, load_config
from cvtkit.dist import launch_local
from cvtkit.train.engine import batch_plan
from cvtkit.train.run_config import RunConfig
from cvtkit.train.trainer import EXIT_REQUEUE
from helpers import REPO, TINY_CONFIG, make_tiny_shards, metrics, train, train_losses, wait

# Plain SGD at lr 1 with no momentum, decay or clipping: one update is exactly the averaged gradient.
PROBE = ["data.train=unused", "model.drop_path_rate=0.0", "optim.name=sgd", "optim.lr=1.0", "optim.momentum=0.0",
         "optim.weight_decay=0.0", "optim.grad_clip=0.0", "data.batch_size=16", "engine.micro_batch=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 training samples / global batch 16 = 4 steps per epoch (make_tiny_shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("many_ranks"))


def probe(tmp_path, overrides: list[str]) -> dict:
    """tests/engine_probe.py on 2 ranks: micro 4 x accumulation 2 x 2 ranks = 16."""
    out = tmp_path / "probe"
    procs = launch_local(2, [sys.executable, str(REPO / "tests/engine_probe.py"), str(out), "--config",
                             str(TINY_CONFIG), "--set", *PROBE, *overrides, "--ema-steps", "3"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    codes, text = wait(procs, timeout=300)
    assert codes == [0, 0], text
    return json.loads((tmp_path / "probe.rank0").read_text())


@pytest.mark.slow
def test_gradients_are_reduced_and_accumulated_in_fp32_and_the_ema_follows_the_masters(tmp_path):
    fp32 = probe(tmp_path, [])
    assert (fp32["model_dtype"], fp32["grad_accum_dtype"], fp32["communication_dtype"]) == \
        ("torch.bfloat16", "torch.float32", "torch.float32")
    assert (fp32["micro"], fp32["accumulation"]) == (4, 2)
    # The fp32 master update equals the update from the bf16 gradients summed in fp32, to 1e-6 of
    # the largest gradient (the summation order differs); bf16 sums miss by about 2^-9 of it.
    assert fp32["update_error"] <= 1e-6 * fp32["update_scale"], fp32
    # The EMA is an EMA of the fp32 masters, to the bit (not of the bf16 working copy).
    assert fp32["ema_error"] == 0.0

    bf16 = probe(tmp_path, ["engine.grad_reduce_dtype=bf16"])  # the bandwidth trade, chosen knowingly
    assert (bf16["grad_accum_dtype"], bf16["communication_dtype"]) == ("torch.bfloat16", "torch.bfloat16")
    assert bf16["update_error"] > 100 * fp32["update_error"]

    zero3 = probe(tmp_path, ["engine.zero_stage=3"])  # each rank averages its own partition
    assert zero3["grad_accum_dtype"] == "torch.float32" and zero3["ema_error"] == 0.0


def test_a_world_size_that_cannot_make_the_global_batch_names_the_ones_that_can():
    cfg = load_config(RunConfig, TINY_CONFIG, ["data.train=x", "engine.micro_batch=4"])  # 16 = 4 x ... x world
    assert batch_plan(cfg, 2) == (4, 2) and batch_plan(cfg, 4) == (4, 1)
    with pytest.raises(ConfigError, match=r"cannot hold on 3 ranks; the world sizes that can: 1, 2, 4$"):
        batch_plan(cfg, 3)


def test_every_recipe_pins_the_per_gpu_batch():
    recipes = [p for p in sorted((REPO / "configs").glob("*/*.yaml")) if not p.stem.startswith(("tiny", "demo"))]
    assert len(recipes) == 10
    for path in recipes:
        cfg = load_config(RunConfig, path)
        assert cfg.engine.micro_batch and cfg.data.batch_size % cfg.engine.micro_batch == 0, path
        assert f"micro batch {cfg.engine.micro_batch}" in path.read_text(), path  # the header's arithmetic


@pytest.mark.slow
def test_two_ranks_then_one(shards, tmp_path):
    """2 ranks x micro 8, stopped at step 4: both ranks hold the same BatchNorm statistics. Resumed
    on 1 rank: the same global and micro batch with accumulation 2, the losses go on, an EMA turned
    on at the resume starts from the restored weights, and the final validation equals
    finetune/evaluate.py on the final checkpoint."""
    run = tmp_path / "tiny_cpu"
    buffers = tmp_path / "buffers.pt"
    codes, out = train(tmp_path, shards, ["engine.micro_batch=8", "checkpoint.stop_at_step=4"],
                       script="tests/fault_train.py", env={"CVTKIT_DUMP_BUFFERS": str(buffers)})
    assert codes == [EXIT_REQUEUE] * 2, out
    rank0, rank1 = (torch.load(f"{buffers}.rank{r}", weights_only=True) for r in (0, 1))
    assert any(k.endswith("running_var") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    before = train_losses(run)

    codes, out = train(tmp_path, shards, ["engine.micro_batch=8", "ema.decay=0.9"], nproc=1)
    assert codes == [0], out
    assert "micro batch 8 x accumulation 2 x 1 ranks" in out
    assert "has no EMA: the EMA starts from the weights of step 4" in out
    after = train_losses(run)
    assert set(after) >= set(range(6, 17, 2)) and after[16] < before[2]
    assert (run / "checkpoints" / tag_for(16) / "ema.pt").is_file()

    final = [m for m in metrics(run) if "val/top1" in m][-1]
    result = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "finetune/evaluate.py", "--checkpoint", str(run), "--data", shards,
                           "--workers", "0", "--out", str(result)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(result.read_text())
    assert scored["precision"] == "bf16" and scored["count"] == final["val/count"]
    assert scored["top1"] == final["val/top1"] and scored["loss"] == pytest.approx(final["val/loss"], rel=1e-4)


def views(dump: Path, kind: str, step: int, nproc: int) -> list[dict]:
    """Each rank's `optimizer_view` (tests/fault_train.py) after the save or the restore of `step`."""
    return [torch.load(f"{dump}.{kind}.{step}.rank{r}", weights_only=True) for r in range(nproc)]


def assert_same_optimizer(restored: list[dict], saved: list[dict], step: int) -> None:
    """Every rank's restored fp32 masters and Adam moments equal the saved ones to the bit, for
    every parameter; every rank's optimizer counts `step` updates."""
    for view in restored:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert view[key].keys() == saved[0][key].keys()
            for name, value in saved[0][key].items():
                assert view[key][name].dtype == torch.float32 and torch.equal(view[key][name], value), (key, name)
        assert view["steps"] == [float(step)] and view["lr"] == saved[0]["lr"], (view["steps"], view["lr"])
    assert all(view["steps"] == [float(step)] for view in saved)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resharding_keeps_the_fp32_masters_and_the_adam_moments(shards, tmp_path, stage):
    """2 ranks -> 1 -> 2 under ZeRO-`stage` (ZeRO-1 with bf16 reduces gradients in bf16: its fp32
    reduction is refused): after each change of world size, every parameter's fp32 master and
    both Adam moments, read through DeepSpeed's accessors on every rank, equal those saved, the
    optimizer's step count goes on from the saved one, and the learning rate of the next step is
    the one the run before the change logged for it. Each run goes one step past the checkpoint
    it is resumed from and that step's checkpoint loses its `COMPLETE` (as a run killed while
    saving leaves it), so the next run resumes from the one before and repeats the step."""
    run, dump = tmp_path / "tiny_cpu", tmp_path / "optimizer"
    common = [f"engine.zero_stage={stage}", *(["engine.grad_reduce_dtype=bf16"] if stage == 1 else []),
              "engine.micro_batch=8", "checkpoint.every_steps=2", "checkpoint.keep=4", "log.every_steps=1"]
    lr = {}
    for nproc, resumed, stop in ((2, None, 3), (1, 2, 5), (2, 4, 5)):
        codes, out = train(tmp_path, shards, [*common, f"checkpoint.stop_at_step={stop}"], nproc,
                           script="tests/fault_train.py", env={"CVTKIT_DUMP_OPTIMIZER": str(dump)})
        assert codes == [EXIT_REQUEUE] * nproc, out
        if resumed is not None:
            assert f"at step {resumed}" in out and f"x accumulation {2 // nproc} x {nproc} ranks" in out
            assert_same_optimizer(views(dump, "restored", resumed, nproc), views(dump, "saved", resumed, 3 - nproc),
                                  resumed)
            assert {m["step"]: m["train/lr"] for m in metrics(run) if "train/lr" in m}[resumed + 1] == lr[resumed + 1]
        assert all(view["steps"] == [float(stop)] for view in views(dump, "saved", stop, nproc))
        lr.update({m["step"]: m["train/lr"] for m in metrics(run) if "train/lr" in m})
        (run / "checkpoints" / tag_for(stop) / COMPLETE).unlink()


@pytest.mark.slow
def test_zero3_with_a_non_finite_master_refuses_to_save(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["engine.zero_stage=3"], script="tests/fault_train.py",
                       env={"CVTKIT_PLANT_NAN": "4"})
    assert codes == [1, 1], out
    assert "is not finite; not saving" in out
    assert complete_tags(tmp_path / "tiny_cpu" / "checkpoints") == []


@pytest.mark.slow
def test_a_zero0_checkpoint_resumes_on_another_number_of_ranks(shards, tmp_path):
    fp32 = ["engine.zero_stage=0", "engine.precision=fp32", "engine.micro_batch=8"]
    codes, out = train(tmp_path, shards, [*fp32, "checkpoint.stop_at_step=4"])
    assert codes == [EXIT_REQUEUE] * 2, out
    codes, out = train(tmp_path, shards, fp32, nproc=1)
    assert codes == [0], out
    assert "at step 4" in out and "finished 16 steps" in out
    assert not list((tmp_path / "tiny_cpu" / "checkpoints").glob("*_universal"))  # whole states load as they are


def test_ranks_waiting_for_a_conversion_give_up_at_their_own_timeout_or_on_rank_0s_failure(tmp_path):
    """Rank 1 waits for rank 0's conversion without a process group: it ends with a one-line error
    after `checkpoint.convert_timeout_s`, or as soon as rank 0 has recorded its failure."""
    from cvtkit.checkpoint import ResumeError
    from cvtkit.train.reshard import _attempt_id, convert_on_start
    tag = tag_for(4)
    with pytest.raises(ResumeError, match=r"not converted within checkpoint.convert_timeout_s=1; convert it ahead"):
        convert_on_start(tmp_path, tag, rank=1, timeout_s=1, poll_s=0.1)
    (tmp_path / f".{tag}_universal.failed.{_attempt_id()}").write_text("ds_to_universal ran out of memory")
    with pytest.raises(ResumeError, match="rank 0 failed to convert .*: ds_to_universal ran out of memory"):
        convert_on_start(tmp_path, tag, rank=1, timeout_s=60, poll_s=0.1)
    with pytest.raises(ResumeError, match="conversion to a universal checkpoint failed"):  # nothing to convert
        convert_on_start(tmp_path, tag, rank=0, timeout_s=60)
