"""The training engine for real: DeepSpeed ZeRO 1-3 over two gloo processes on CPU, tiny CvT/CeiT,
tiny learnable shards; exact resume, signals, elastic resume, loud failures."""
import json
import math
import subprocess
import sys

import pytest
import torch

from cvtkit.config_loader import ConfigError, load_config
from cvtkit.checkpoint import COMPLETE, complete_tags, consolidated_state_dict, latest_complete, tag_for
from cvtkit.train.checkpointer import Checkpointer
from cvtkit.train.run_config import RunConfig
from cvtkit.train.schedule import Schedule
from cvtkit.train.metrics import EVENTS_FILE
from cvtkit.train.trainer import EXIT_REQUEUE

from cvtkit.models.factory import build_model

from helpers import (REPO, TINY_CONFIG, assert_same_model, dump_loaded, make_tiny_shards, metrics, signal_when_step,
                     spawn, train, train_losses, wait)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 training samples / global batch 16 = 4 steps per epoch (make_tiny_shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("train"))


def assert_same_tree(a, b, where: str) -> None:
    """Nested containers of tensors and values equal to the bit (tensors: same dtype and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same_tree(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------- pieces, in process

def test_schedule_warmup_then_cosine():
    s = Schedule(peak=1e-3, total_steps=110, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    assert s(0) == pytest.approx(1e-6)
    assert s(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s(110) == pytest.approx(1e-5)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_recipes_load_and_batch_identity():
    for path in sorted((REPO / "configs" / "pretrain").glob("*.yaml")):
        cfg = load_config(RunConfig, path)
        assert cfg.data.batch_size > 0, path
    w24 = load_config(RunConfig, REPO / "configs/pretrain/cvt_w24_224_in22k.yaml")
    assert (w24.model.name, w24.model.num_classes, w24.data.batch_size, w24.optim.lr,
            w24.optim.weight_decay, w24.model.drop_path_rate) == ("cvt_w24", 21841, 2048, 2e-3, 0.1, 0.3)
    c13 = load_config(RunConfig, REPO / "configs/pretrain/cvt_13_224_in1k.yaml")
    assert (c13.optim.lr, c13.optim.weight_decay, c13.schedule.epochs, c13.schedule.warmup_epochs,
            c13.schedule.min_lr, c13.data.augment.auto_augment) == (2e-3, 0.05, 300, 5, 1e-5,
                                                                    "rand-m9-mstd0.5-inc1")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"--set: optim.lrr: unknown key"):
        load_config(RunConfig, TINY_CONFIG, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"engine.zero_stage: expected 0, 1, 2 or 3"):
        load_config(RunConfig, TINY_CONFIG, ["engine.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"engine.zero_stage: .*BF16_Optimizer.*zero_to_fp32"):
        load_config(RunConfig, TINY_CONFIG, ["engine.zero_stage=1"])
    with pytest.raises(ConfigError, match=r"schedule.epochs: expected exactly one"):
        load_config(RunConfig, TINY_CONFIG, ["schedule.steps=10"])


def test_checkpoint_pointer_ignores_partial_and_prunes(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        (ckpt / tag_for(step)).mkdir(parents=True)
        if complete:
            (ckpt / tag_for(step) / COMPLETE).write_text("")
    (ckpt / "latest").write_text(tag_for(8))  # as DeepSpeed's own pointer could after a kill
    assert latest_complete(ckpt) == tag_for(6)
    Checkpointer(ckpt, rank=0, world_size=1, keep=2)._prune(tag_for(6))
    assert complete_tags(ckpt) == [tag_for(4), tag_for(6)]
    assert (ckpt / tag_for(8)).exists()  # newer than the newest complete one: left alone


def test_bad_input_is_one_line(shards, tmp_path):
    import shutil
    (tmp_path / "empty").mkdir()
    partial = tmp_path / "partial"
    shutil.copytree(shards, partial)
    lost = sorted(partial.glob("*-train-*.tar"))[1]
    lost.unlink()
    cases = [(["data.train=/nonexistent"], "data.train: /nonexistent: no such shard folder"),
             ([f"data.train={tmp_path / 'empty'}"], f"data.train: {tmp_path / 'empty'}: no _info.json"),
             ([f"data.train={partial}"], f"{lost}: listed in {partial / '_info.json'} but absent"),
             (["model.num_classes=7"], "model.num_classes=7 but"),
             (["checkpoint.resume=require"], "has no complete checkpoint"),
             (["data.batch_size=18", "engine.micro_batch=4"], "data.batch_size=18 is not engine.micro_batch=4"),
             (["optim.lr=-1"], "optim.lr: expected a positive")]
    for overrides, expected in cases:
        codes, out = train(tmp_path, shards, overrides, nproc=1)
        assert codes == [2], out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], out


# ---------------------------------------------------------------- two processes

@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_under_each_zero_stage(shards, tmp_path, stage):
    # ZeRO-1 with bf16 reduces gradients in bf16 (DeepSpeed's fp32 path for it is BF16_Optimizer)
    engine = [f"engine.zero_stage={stage}", *(["engine.grad_reduce_dtype=bf16"] if stage == 1 else [])]
    codes, out = train(tmp_path, shards, [*engine, "schedule.epochs=2"])
    assert codes == [0, 0], out
    assert "global batch 16 = micro batch 8 x accumulation 1 x 2 ranks" in out
    run = tmp_path / "tiny_cpu"
    losses = train_losses(run)
    assert sorted(losses) == [2, 4, 6, 8]
    assert all(math.isfinite(v) for v in losses.values())
    assert latest_complete(run / "checkpoints") == tag_for(8)
    assert (run / "tensorboard").is_dir() and (run / "config.yaml").is_file()
    if stage == 2:  # the toy task is learnt
        assert losses[8] < 0.7 * losses[2], losses
        val = [m for m in metrics(run) if "val/top1" in m][-1]
        assert val["val/top1"] >= 75 and val["val/count"] == 16
    # round trip: the model loaded back under the same stage is the consolidated file, and not
    # the initial model
    saved = consolidated_state_dict(run / "checkpoints" / tag_for(8))
    loaded = dump_loaded(tmp_path, shards, [*engine, "schedule.epochs=2"])
    assert loaded["step"] == 8
    assert_same_model(loaded["state"], saved)
    initial = build_model(load_config(RunConfig, TINY_CONFIG, [f"data.train={shards}"]).model).state_dict()
    assert not torch.equal(initial["head.weight"], saved["head.weight"])


@pytest.mark.slow
def test_ceit_with_accumulation_and_ema(shards, tmp_path):
    ceit = ["model.name=ceit_tiny", "model.img_size=32", "model.options={embed_dim: 32, num_heads: 2, depth: 3}"]
    # 64 training samples / global batch 16 = 4 steps per epoch; micro batch 4 x 2 ranks -> accumulation 2
    codes, out = train(tmp_path, shards, [*ceit, "engine.micro_batch=4", "ema.decay=0.9", "schedule.epochs=1"])
    assert codes == [0, 0], out
    assert "micro batch 4 x accumulation 2 x 2 ranks" in out
    ema = torch.load(tmp_path / "tiny_cpu/checkpoints" / tag_for(4) / "ema.pt", weights_only=True)
    assert any(k.endswith("pos_embed") for k in ema)


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(shards, tmp_path):
    common = ["log.every_steps=1", "data.workers=1", "checkpoint.every_steps=0", "ema.decay=0.9",
              "data.augment={kind: deit, re_prob: 0.25, mixup_alpha: 0.8, cutmix_alpha: 1.0}"]
    codes, out = train(tmp_path / "a", shards, common)
    assert codes == [0, 0], out
    codes, out = train(tmp_path / "b", shards, common + ["checkpoint.stop_at_step=6"])
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "stopped at checkpoint.stop_at_step at step 6/16" in out
    codes, out = train(tmp_path / "b", shards, common)
    assert codes == [0, 0], out
    assert "resumed from" in out and "at step 6" in out
    full, resumed = train_losses(tmp_path / "a/tiny_cpu"), train_losses(tmp_path / "b/tiny_cpu")
    assert sorted(full) == sorted(resumed) == list(range(1, 17))
    assert full == resumed
    # ... and the final state is the same to the bit: model, optimizer, EMA, RNG, loader, step
    a, b = (tmp_path / run / "tiny_cpu/checkpoints" / tag_for(16) for run in "ab")
    files = sorted(p.name for p in a.glob("*.pt"))
    assert files == sorted(p.name for p in b.glob("*.pt")) and "ema.pt" in files
    assert any("optim_states" in f for f in files) and "trainer_rank00001.pt" in files
    for name in files:
        assert_same_tree(torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), name)


@pytest.mark.slow
def test_sigusr1_saves_at_a_step_boundary_and_exits_for_requeue(shards, tmp_path):
    argv = ["--config", str(TINY_CONFIG), "--set", f"data.train={shards}", f"data.val={shards}",
            f"out_dir={tmp_path}", "checkpoint.every_steps=0", "log.every_steps=1", "schedule.epochs=50"]
    procs = spawn(2, argv)
    signal_when_step(procs, tmp_path / "tiny_cpu", 3)
    codes, out = wait(procs)
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "stopped by signal" in out
    tags = complete_tags(tmp_path / "tiny_cpu/checkpoints")
    assert len(tags) == 1
    saved = int(tags[0].removeprefix("step"))
    assert saved >= 3 and saved < 200
    codes, out = train(tmp_path, shards, ["checkpoint.every_steps=0", "schedule.epochs=50",
                                          "checkpoint.stop_at_step=" + str(saved + 2)])
    assert codes == [EXIT_REQUEUE] * 2 and f"at step {saved}" in out, out


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["checkpoint.stop_at_step=4"])
    assert codes == [EXIT_REQUEUE] * 2, out
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    loaded = dump_loaded(tmp_path, shards, nproc=1)  # the model after resharding is the saved one
    assert loaded["step"] == 4 and (ckpt / (tag_for(4) + "_universal") / COMPLETE).is_file()
    assert_same_model(loaded["state"], consolidated_state_dict(ckpt / tag_for(4)))
    codes, out = train(tmp_path, shards, [], nproc=1)
    assert codes == [0], out
    assert "micro batch 16 x accumulation 1 x 1 ranks" in out and "approximate" in out
    assert "at step 4" in out and "finished 16 steps" in out
    # the conversion is pruned with its checkpoint once newer ones are complete
    assert complete_tags(tmp_path / "tiny_cpu/checkpoints") == [tag_for(12), tag_for(16)]
    assert not (tmp_path / "tiny_cpu/checkpoints" / (tag_for(4) + "_universal")).exists()


@pytest.mark.slow
def test_resume_with_a_contradicting_config_fails(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["checkpoint.stop_at_step=2"], nproc=1)
    assert codes == [EXIT_REQUEUE], out
    codes, out = train(tmp_path, shards, ["data.batch_size=32", "model.drop_path_rate=0.1"], nproc=1)
    assert codes == [2], out
    assert "contradicts the config (global_batch: checkpoint 16, config 32)" in out
    # the same number of classes, but other synsets: the head's rows would mean other things
    others = make_tiny_shards(tmp_path / "others", synsets=["n01530575", "n01531178", "n01532829", "n01534433"])
    codes, out = train(tmp_path, others, [], nproc=1)
    assert codes == [2], out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "contradicts the config (classes_sha: checkpoint" in errors[0], out


@pytest.mark.slow
def test_diverging_run_stops_without_saving_bad_weights(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["optim.lr=1e6", "optim.grad_clip=0", "checkpoint.every_steps=1",
                                          "engine.max_nonfinite=2", "schedule.warmup_steps=0"], nproc=1)
    assert codes == [1], out
    assert "not finite" in out
    events = [json.loads(line) for line in (tmp_path / "tiny_cpu" / EVENTS_FILE).read_text().splitlines()]
    assert events and all(e["event"] == "nonfinite" and e["steps"] >= 1 for e in events), events
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    tag = latest_complete(ckpt)
    if tag is not None:  # whatever was saved holds finite weights
        state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_entry_point_help_runs():
    out = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout


def test_deepspeed_launcher_argument_is_accepted():
    """`deepspeed pretrain/train.py ...` adds --local_rank; the config is still what is checked."""
    out = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--local_rank=0", "--config",
                          str(TINY_CONFIG), "--set", "optim.lrr=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--set: optim.lrr: unknown key" in out.stderr
