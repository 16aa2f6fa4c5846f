"""Faults injected into real training runs (DeepSpeed over gloo, two CPU processes, tiny CvT):
kills during a save and during training, a full disk, damaged shards, bf16 clipping, ZeRO
round trips, untrusted files. Each test names the guarantee of the README it proves."""
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvtkit.config_loader import ConfigError, load_config
from cvtkit.models.factory import build_model
from cvtkit.checkpoint import COMPLETE, complete_tags, consolidated_state_dict, latest_complete, tag_for
from cvtkit.train.run_config import RunConfig
from cvtkit.train.trainer import EXIT_REQUEUE

from fake_imagenet import damage
from helpers import (TINY_CONFIG, assert_same_model, cannot_run, dump_loaded, make_tiny_shards, metrics, train,
                     train_losses)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 training samples / global batch 16 = 4 steps per epoch (make_tiny_shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("reliability"))


# ---------------------------------------------------------------- kills

@pytest.mark.slow
@pytest.mark.parametrize("rank,name", [(1, "optim_states"), (0, COMPLETE)])
def test_kill_during_save_keeps_the_previous_checkpoint(shards, tmp_path, rank, name):
    """kill -9 of one rank in the middle of the step-4 save (DeepSpeed writing the optimizer
    shards, or just before COMPLETE): the other rank ends, `latest` still names step 2, keep=1 did
    not delete it, and the rerun resumes from it and completes."""
    overrides = ["checkpoint.every_steps=2", "checkpoint.keep=1", "schedule.epochs=2",
                 "engine.dist_timeout_s=30", "log.every_steps=1"]
    codes, out = train(tmp_path, shards, overrides, script="tests/fault_train.py",
                       env={"CVTKIT_KILL_AT_SAVE": f"4:{rank}:{name}"})
    # the other rank exited on its own, with an error (one that hangs fails `train`'s wait instead)
    assert codes[rank] == -signal.SIGKILL and codes[1 - rank] > 0 and codes[1 - rank] != EXIT_REQUEUE, out
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    assert (ckpt / "latest").read_text().strip() == tag_for(2)
    assert complete_tags(ckpt) == [tag_for(2)] and latest_complete(ckpt) == tag_for(2)
    assert (ckpt / tag_for(4)).is_dir() and not (ckpt / tag_for(4) / COMPLETE).exists()  # the partial one

    codes, out = train(tmp_path, shards, overrides)
    assert codes == [0, 0], out
    assert f"resumed from {ckpt / tag_for(2)} at step 2" in out and "finished 8 steps" in out
    assert complete_tags(ckpt) == [tag_for(8)] and not (ckpt / tag_for(4)).exists()
    assert sorted(train_losses(tmp_path / "tiny_cpu")) == list(range(1, 9))


@pytest.mark.slow
def test_a_killed_rank_ends_the_others_and_the_job_resumes(shards, tmp_path):
    """A rank dies mid-training (kill -9 of rank 1 right after step 5, tests/fault_train.py): the
    survivor ends by itself with an error instead of hanging, and the restarted job resumes from
    the last complete checkpoint (step 4)."""
    run = tmp_path / "tiny_cpu"
    overrides = ["checkpoint.every_steps=2", "schedule.epochs=50", "engine.dist_timeout_s=20", "log.every_steps=1"]
    codes, out = train(tmp_path, shards, overrides, script="tests/fault_train.py", env={"CVTKIT_KILL_RANK_AT_STEP": "5:1"})
    assert codes[1] == -signal.SIGKILL and codes[0] > 0, out  # rank 0 exited on its own, with an error
    assert latest_complete(run / "checkpoints") == tag_for(4)

    codes, out = train(tmp_path, shards, overrides + ["checkpoint.stop_at_step=6"])
    assert codes == [EXIT_REQUEUE] * 2, out
    assert f"resumed from {run / 'checkpoints' / tag_for(4)} at step 4" in out
    assert latest_complete(run / "checkpoints") == tag_for(6)


# ---------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: a real file system that fills up (needs root, as CI runs)."""
    if os.geteuid() != 0:
        cannot_run("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        cannot_run(f"mounting a small tmpfs failed: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(shards, small_disk):
    ckpt = small_disk / "tiny_cpu/checkpoints"
    codes, out = train(small_disk, shards, ["checkpoint.stop_at_step=4"])
    assert codes == [EXIT_REQUEUE] * 2, out
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave 256 KiB: room for the logs, not for a checkpoint
        f.write(b"\0" * (free - 256 * 1024))
    codes, out = train(small_disk, shards, [])
    assert codes == [1, 1], out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert f"saving checkpoint {ckpt / tag_for(8)} failed" in errors[0]
    assert f"the previous checkpoint ({tag_for(4)}) is intact" in errors[0]
    assert complete_tags(ckpt) == [tag_for(4)] and not (ckpt / tag_for(8)).exists()

    filler.unlink()
    codes, out = train(small_disk, shards, [])
    assert codes == [0, 0], out
    assert "at step 4" in out and "finished 16 steps" in out


# ---------------------------------------------------------------- ZeRO round trips, elastic resume

@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks_with_the_same_model(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["checkpoint.stop_at_step=4"], nproc=1)
    assert codes == [EXIT_REQUEUE], out
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    saved = consolidated_state_dict(ckpt / tag_for(4))
    # Converted ahead of the job by the command, over what a killed conversion left behind.
    (ckpt / f"{tag_for(4)}_universal.partial").mkdir()
    (ckpt / f"{tag_for(4)}_universal.partial" / "half-written").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "cvtkit.train.reshard", str(tmp_path / "tiny_cpu")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    universal = ckpt / f"{tag_for(4)}_universal"
    converted_at = (universal / COMPLETE).stat().st_mtime_ns
    assert not (ckpt / f"{tag_for(4)}_universal.partial").exists()
    loaded = dump_loaded(tmp_path, shards, nproc=2)  # the start reuses the complete conversion
    assert (universal / COMPLETE).stat().st_mtime_ns == converted_at
    assert loaded["step"] == 4
    assert_same_model(loaded, saved)
    # Rank 1 had no saved state: its random stream is its own, not a copy of rank 0's.
    for kind in ("torch", "numpy", "python"):
        assert not torch.equal(loaded["draws"][0][kind], loaded["draws"][1][kind]), kind
    codes, out = train(tmp_path, shards, [])
    assert codes == [0, 0], out
    assert "micro batch 8 x accumulation 1 x 2 ranks" in out
    assert "at step 4" in out and "finished 16 steps" in out


# ---------------------------------------------------------------- numerics

@pytest.mark.slow
def test_gradient_clipping_clips_in_bf16(shards, tmp_path):
    """SGD without momentum at lr 1: each update is the clipped gradient, so the fp32 master
    weights move by `grad_clip` in norm, to 1e-6 (DeepSpeed scales by clip / (norm + 1e-6); fp32
    rounding), while the logged (pre-clip) norm is far larger."""
    clip = 0.05
    codes, out = train(tmp_path, shards, [
        "optim={name: sgd, lr: 1.0, momentum: 0.0, weight_decay: 0.0, grad_clip: 0.05}",
        "schedule={kind: constant, epochs: null, steps: 3, warmup_steps: 0}", "checkpoint.every_steps=1",
        "checkpoint.keep=3", "log.every_steps=1"])
    assert codes == [0, 0], out
    run = tmp_path / "tiny_cpu"
    cfg = load_config(RunConfig, TINY_CONFIG, [f"data.train={tmp_path}"])
    params = {name for name, _ in build_model(cfg.model).named_parameters()}
    before, after = (consolidated_state_dict(run / "checkpoints" / tag_for(s)) for s in (2, 3))
    moved = torch.sqrt(sum(((after[k].double() - before[k].double()) ** 2).sum() for k in params)).item()
    pre_clip = next(m["train/grad_norm"] for m in metrics(run) if m.get("step") == 3)
    assert pre_clip > 10 * clip
    assert moved == pytest.approx(clip, rel=1e-6)


# ---------------------------------------------------------------- damaged data

@pytest.mark.slow
def test_training_goes_on_over_damaged_shards(tmp_path):
    shards = Path(make_tiny_shards(tmp_path / "data"))
    train_shards = sorted(shards.glob("*-train-*.tar"))
    damage(train_shards[0], "truncate")
    damage(train_shards[1], "corrupt_jpeg")
    codes, out = train(tmp_path, str(shards), ["schedule.epochs=2", "log.every_steps=1"], nproc=1)
    assert codes == [0], out
    assert "damaged samples or shards" in out and "finished 8 steps" in out
    damaged = [m["data/damaged"] for m in metrics(tmp_path / "tiny_cpu") if "data/damaged" in m]
    assert damaged[-1] >= 2


@pytest.mark.slow
def test_nothing_readable_is_a_one_line_error(tmp_path):
    """Every training shard unreadable: one line naming them (through a loader worker, whose
    traceback DataLoader folds into the message), not a traceback and not a hang."""
    shards = Path(make_tiny_shards(tmp_path / "data"))
    for shard in shards.glob("*-train-*.tar"):
        shard.write_bytes(b"not a tar at all" * 10)
    codes, out = train(tmp_path, str(shards), ["data.workers=1"], nproc=1)
    assert codes == [1], out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no readable sample in {shards}/"), out


# ---------------------------------------------------------------- untrusted input

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_yaml_config_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(TINY_CONFIG.read_text() + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, config)
    assert not marker.exists()


@pytest.mark.slow
def test_a_pickle_in_a_checkpoint_is_refused_not_run(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["checkpoint.stop_at_step=4"], nproc=1)
    assert codes == [EXIT_REQUEUE], out
    marker = tmp_path / "ran"
    folder = tmp_path / "tiny_cpu/checkpoints" / tag_for(4)
    # a torch.save file whose pickle calls a function, and a plain pickle
    for victim, write in (("mp_rank_00_model_states.pt", torch.save), ("trainer_rank00000.pt", pickle.dump)):
        original = (folder / victim).read_bytes()
        with open(folder / victim, "wb") as f:
            write({"step": _RunsCode(marker)}, f)
        codes, out = train(tmp_path, shards, [], nproc=1)
        assert codes == [2], out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{folder / victim}: refused" in errors[0], out
        assert not marker.exists()
        (folder / victim).write_bytes(original)


def test_rng_state_loads_without_pickled_objects(tmp_path):
    """The trainer's RNG state survives torch.save -> torch.load(weights_only=True)."""
    import random

    import numpy as np

    from cvtkit.rng import RngState
    torch.save(RngState().state_dict(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    RngState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
