"""The training engine for real: DeepSpeed ZeRO 1-3 over two gloo processes on CPU, tiny CvT/CeiT,
tiny learnable shards; exact resume, signals, elastic resume, loud failures."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from cvtkit.config_loader import ConfigError, load_config
from cvtkit.checkpoint import COMPLETE, complete_tags, consolidated_state_dict, latest_complete, tag_for
from cvtkit.train.checkpointer import Checkpointer
from cvtkit.train.run_config import RunConfig
from cvtkit.train.schedule import Schedule
from cvtkit.train.metrics import EVENTS_FILE, NEW_RUN, REQUEUES_FILE, STARTS_FILE
from cvtkit.train.trainer import EXIT_REQUEUE

from cvtkit.models.factory import build_model

from helpers import (REPO, TINY_CONFIG, jsonl, assert_same_model, dump_loaded, make_tiny_shards, metrics,
                     spawn, submit_with_faults, submitit_logs, train, train_argv, train_losses, wait)


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
    # all at once, each in its own run folder: seven start-ups share the cores instead of queueing
    runs = [spawn(1, train_argv(tmp_path / f"case{i}", shards, overrides)) for i, (overrides, _) in enumerate(cases)]
    for procs, (overrides, expected) in zip(runs, cases):
        codes, out = wait(procs)
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
    assert losses[8] < 0.7 * losses[2], losses  # the toy task is learnt under every stage
    val = [m for m in metrics(run) if "val/top1" in m][-1]
    assert val["val/top1"] >= 75 and val["val/count"] == 16
    # round trip: the model loaded back under the same stage is the consolidated file, and not
    # the initial model
    saved = consolidated_state_dict(run / "checkpoints" / tag_for(8))
    loaded = dump_loaded(tmp_path, shards, [*engine, "schedule.epochs=2"])
    assert loaded["step"] == 8
    assert_same_model(loaded, saved)
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


# Exact resume: every random draw counts (workers, augmentation, Mixup/CutMix, erasing, an EMA);
# a checkpoint every 4 steps, and a log line every step.
EXACT = ["log.every_steps=1", "data.workers=1", "checkpoint.every_steps=4", "ema.decay=0.9",
         "data.augment={kind: deit, re_prob: 0.25, mixup_alpha: 0.8, cutmix_alpha: 1.0}"]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """The run folder of 16 steps without a stop, which every interrupted one must equal."""
    root = tmp_path_factory.mktemp("uninterrupted")
    codes, out = train(root, shards, EXACT)
    assert codes == [0, 0], out
    return root / "tiny_cpu"


def assert_same_run(run, uninterrupted) -> None:
    """Every loss `run` logged (before and after its interruption) is the uninterrupted run's for
    that step, to the bit, every step is there, and the final checkpoints are the same to the bit:
    model, optimizer shards, EMA, each rank's RNG and loader position, step."""
    full = train_losses(uninterrupted)
    logged = [(m["step"], m["train/loss"]) for m in metrics(run) if "train/loss" in m]
    assert sorted(full) == sorted({step for step, _ in logged}) == list(range(1, 17))
    assert [loss for _, loss in logged] == [full[step] for step, _ in logged], (logged, full)
    a, b = (folder / "checkpoints" / tag_for(16) for folder in (uninterrupted, run))
    files = sorted(p.name for p in a.glob("*.pt"))
    assert files == sorted(p.name for p in b.glob("*.pt")) and "ema.pt" in files
    assert any("optim_states" in f for f in files) and "trainer_rank00001.pt" in files
    for name in files:
        assert_same_tree(torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), name)


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(shards, tmp_path, uninterrupted):
    codes, out = train(tmp_path, shards, EXACT + ["checkpoint.stop_at_step=6"])
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "stopped at checkpoint.stop_at_step at step 6/16" in out
    codes, out = train(tmp_path, shards, EXACT)
    assert codes == [0, 0], out
    assert "resumed from" in out and "at step 6" in out
    assert_same_run(tmp_path / "tiny_cpu", uninterrupted)


@pytest.mark.slow
def test_kill_9_of_every_rank_resumes_to_the_same_run(shards, tmp_path, uninterrupted):
    """Every rank SIGKILLed three steps after the periodic checkpoint of step 4 (at step 7, before
    it is logged: tests/fault_train.py): the restart resumes from step 4, and everything from there
    on equals the uninterrupted run to the bit."""
    run = tmp_path / "tiny_cpu"
    codes, out = train(tmp_path, shards, EXACT, script="tests/fault_train.py", env={"CVTKIT_KILL_AT_STEP": "7"})
    assert codes == [-signal.SIGKILL] * 2, out
    assert complete_tags(run / "checkpoints") == [tag_for(4)] and max(train_losses(run)) == 6
    codes, out = train(tmp_path, shards, EXACT)
    assert codes == [0, 0], out
    assert f"resumed from {run / 'checkpoints' / tag_for(4)} at step 4" in out
    assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_sigusr1_saves_at_a_step_boundary_and_exits_for_requeue(shards, tmp_path):
    """SIGUSR1 reaches every rank right after step 3 (tests/fault_train.py): the ranks agree on it
    in step 4's all-reduce, save step 4 and only it, and exit 75, though the schedule has 200
    steps; the requeued run resumes from step 4."""
    overrides = ["checkpoint.every_steps=0", "log.every_steps=1", "schedule.epochs=50"]
    codes, out = train(tmp_path, shards, overrides, script="tests/fault_train.py", env={"CVTKIT_SIGNAL_AT": "3"})
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "stopped by signal at step 4/200" in out
    assert complete_tags(tmp_path / "tiny_cpu/checkpoints") == [tag_for(4)]
    assert max(train_losses(tmp_path / "tiny_cpu")) == 4
    codes, out = train(tmp_path, shards, [*overrides, "checkpoint.stop_at_step=6"])
    assert codes == [EXIT_REQUEUE] * 2 and "at step 4" in out, out
    assert sorted(train_losses(tmp_path / "tiny_cpu")) == list(range(1, 7))


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(shards, tmp_path):
    """SIGTERM (Slurm's preemption) reaches rank 1 alone once step 3 is done (tests/fault_train.py):
    both ranks stop after step 4, save that one checkpoint together and exit 75."""
    codes, out = train(tmp_path, shards, ["checkpoint.every_steps=0", "log.every_steps=1"],
                       script="tests/fault_train.py", env={"CVTKIT_SIGNAL_AT_STEP": "3:1:TERM"})
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "stopped by signal at step 4/16" in out
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == complete_tags(ckpt) == [tag_for(4)]
    assert [torch.load(ckpt / tag_for(4) / f"trainer_rank{r:05d}.pt", weights_only=True)["trainer"]["step"]
            for r in (0, 1)] == [4, 4]
    assert max(train_losses(tmp_path / "tiny_cpu")) == 4


@pytest.mark.slow
def test_a_stop_signal_acts_at_the_next_agreement_read_not_the_next_log_step(shards, tmp_path):
    """The loop reads the ranks' agreement every `checkpoint.signal_check_steps` (here 3) besides
    log steps (here every 8): SIGTERM reaching rank 1 once step 4 is done stops both ranks at
    step 6, not at the log step 8."""
    overrides = ["checkpoint.every_steps=0", "log.every_steps=8", "checkpoint.signal_check_steps=3"]
    codes, out = train(tmp_path, shards, overrides, script="tests/fault_train.py",
                       env={"CVTKIT_SIGNAL_AT_STEP": "4:1:TERM"})
    assert codes == [EXIT_REQUEUE] * 2, out
    assert "stopped by signal at step 6/16" in out
    assert complete_tags(tmp_path / "tiny_cpu/checkpoints") == [tag_for(6)]


@pytest.mark.slow
def test_submitit_usr2_to_one_rank_saves_requeues_through_submitit_and_resumes(shards, tmp_path, monkeypatch):
    """submitit's preemption signal (USR2) reaches rank 1 alone once step 3 is done, in a job of
    submitit's local executor: both ranks stop after step 4 and save, submitit's own handler
    (which acts on rank 0, which never received the signal) resubmits the job, and the requeued
    job resumes from step 4 and finishes."""
    job = submit_with_faults(monkeypatch, tmp_path, shards, ["checkpoint.every_steps=0", "log.every_steps=1"],
                             {"CVTKIT_SIGNAL_AT_STEP": "3:1:USR2"}, cluster="local")
    codes = job.results()
    logs = submitit_logs(tmp_path)
    assert codes == [0, 0], logs
    run = tmp_path / "tiny_cpu"
    assert "stopped by signal at step 4/16" in logs and "Requeued job" in logs, logs
    assert f"resumed from {run / 'checkpoints' / tag_for(4)} at step 4" in logs and "finished 16 steps" in logs
    ends = jsonl(run / REQUEUES_FILE)  # by TrainJob.checkpoint
    assert [(e["rc"], e["requeue"]) for e in ends] == [(EXIT_REQUEUE, True)], ends
    starts = jsonl(run / STARTS_FILE)
    assert [(s["step"], s["reason"]) for s in starts] == [(0, NEW_RUN), (4, ends[0]["reason"])], starts
    assert sorted({m["step"] for m in metrics(run) if "train/loss" in m}) == list(range(1, 17))


@pytest.mark.slow
def test_submitit_local_job_requeues_after_a_killed_rank_and_resumes(shards, tmp_path, monkeypatch):
    """kill -9 of rank 1 once step 6 is done, past the checkpoint of step 4, in a job of submitit's
    local executor: rank 0 ends on the broken collective (a traceback), decides to requeue
    (progress since the start) and hands over to submitit's requeue, which starts both tasks
    again; the job resumes from step 4 and finishes. (On Slurm: test_slurm_train.py.)"""
    job = submit_with_faults(monkeypatch, tmp_path, shards, ["checkpoint.every_steps=4", "engine.dist_timeout_s=30"],
                             {"CVTKIT_KILL_RANK_AT_STEP": "6:1"}, cluster="local")
    codes = job.results()
    logs = submitit_logs(tmp_path)
    assert codes == [0, 0], logs
    run = tmp_path / "tiny_cpu"
    ends = jsonl(run / REQUEUES_FILE)
    assert len(ends) == 1 and ends[0]["requeue"] and ends[0]["checkpoint_step"] == 4, ends
    assert f"[cvtkit] requeue: {ends[0]['reason']}" in logs and "Requeued job" in logs, logs
    assert "Traceback" in logs and "finished 16 steps" in logs, logs
    starts = jsonl(run / STARTS_FILE)
    assert [(s["step"], s["reason"]) for s in starts] == [(0, NEW_RUN), (4, ends[0]["reason"])], starts


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["checkpoint.stop_at_step=4"])
    assert codes == [EXIT_REQUEUE] * 2, out
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    loaded = dump_loaded(tmp_path, shards, nproc=1)  # the model after resharding is the saved one
    assert loaded["step"] == 4 and (ckpt / (tag_for(4) + "_universal") / COMPLETE).is_file()
    assert_same_model(loaded, consolidated_state_dict(ckpt / tag_for(4)))
    codes, out = train(tmp_path, shards, [], nproc=1)
    assert codes == [0], out
    assert "micro batch 16 x accumulation 1 x 1 ranks" in out
    assert "at step 4" in out and "finished 16 steps" in out
    # the conversion is pruned with its checkpoint once newer ones are complete
    assert complete_tags(tmp_path / "tiny_cpu/checkpoints") == [tag_for(12), tag_for(16)]
    assert not (tmp_path / "tiny_cpu/checkpoints" / (tag_for(4) + "_universal")).exists()


@pytest.fixture(scope="module")
def saved_run(shards, tmp_path_factory):
    """A one-rank run of the tiny config stopped (and saved) at step 2; its folder's parent."""
    root = tmp_path_factory.mktemp("saved")
    codes, out = train(root, shards, ["checkpoint.stop_at_step=2"], nproc=1)
    assert codes == [EXIT_REQUEUE], out
    return root


def start_without_peers(argv: list[str]) -> tuple[int, str]:
    """Rank 0 of a two-rank job whose rank 1 never starts: it can only end (rather than wait for
    rank 1 in the process group's rendezvous, until `engine.dist_timeout_s`) when it ends before
    any process group exists."""
    # Port 0: no rendezvous is meant to happen; one that did would wait for rank 1 on a port of
    # the system's choosing.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain/train.py"), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    codes, out = wait([proc])
    return codes[0], out


def _tiny_cvt(dims=(16, 32, 64), heads=(1, 2, 2), depths=(1, 1, 2)) -> str:
    """The tiny config's `model.options` as meta.json and the error message spell them."""
    return str({"dims": list(dims), "heads": list(heads), "depths": list(depths)})


@pytest.mark.slow
@pytest.mark.parametrize("overrides,differs", [
    (["data.batch_size=32", "model.drop_path_rate=0.1"], "global_batch: checkpoint 16, config 32"),
    (["model.name=cvt_21"], "model: checkpoint 'cvt_13', config 'cvt_21'"),
    (["model.options.dims=[16,32,48]"], f"architecture: checkpoint {_tiny_cvt()}, config {_tiny_cvt(dims=(16, 32, 48))}"),
    (["model.options.depths=[1,1,3]"], f"architecture: checkpoint {_tiny_cvt()}, config {_tiny_cvt(depths=(1, 1, 3))}"),
    (["model.options.heads=[1,2,4]"], f"architecture: checkpoint {_tiny_cvt()}, config {_tiny_cvt(heads=(1, 2, 4))}"),
    (["engine.zero_stage=3"], "zero_stage: checkpoint 2, config 3"),
    (["engine.precision=fp32"], "precision: checkpoint 'bf16', config 'fp32'"),
], ids=["global_batch", "model", "dims", "depths", "heads", "zero_stage", "precision"])
def test_resume_with_a_contradicting_config_fails(shards, saved_run, overrides, differs):
    """One line naming the checkpoint and what differs (only that: drop path may change), exit 2,
    before any process group starts: never DeepSpeed's "size mismatch" traceback."""
    code, out = start_without_peers(train_argv(saved_run, shards, [*overrides, "engine.dist_timeout_s=30"]))
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    folder = saved_run / "tiny_cpu/checkpoints" / tag_for(2)
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder} contradicts the config ({differs}); "), out
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_resume_with_other_classes_fails(saved_run, tmp_path):
    """The same number of classes, but other synsets: the head's rows would mean other things."""
    others = make_tiny_shards(tmp_path / "others", synsets=["n01530575", "n01531178", "n01532829", "n01534433"])
    code, out = start_without_peers(train_argv(saved_run, others, ["engine.dist_timeout_s=30"]))
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "contradicts the config (classes_sha: checkpoint" in errors[0], out


@pytest.mark.slow
def test_diverging_run_stops_without_saving_bad_weights(shards, tmp_path):
    codes, out = train(tmp_path, shards, ["optim.lr=1e6", "optim.grad_clip=0", "checkpoint.every_steps=1",
                                          "engine.max_nonfinite=2", "schedule.warmup_steps=0"], nproc=1)
    assert codes == [1], out
    assert "not finite" in out
    events = jsonl(tmp_path / "tiny_cpu" / EVENTS_FILE)
    assert events and all(e["event"] == "nonfinite" and e["steps"] >= 1 for e in events), events
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    tag = latest_complete(ckpt)
    if tag is not None:  # whatever was saved holds finite weights
        state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


NONFINITE = ["checkpoint.every_steps=1", "checkpoint.keep=8", "schedule.epochs=2", "engine.max_nonfinite=2",
             "log.every_steps=1", "engine.dist_timeout_s=60"]


def parameter_names(shards: str) -> set[str]:
    cfg = load_config(RunConfig, TINY_CONFIG, [f"data.train={shards}"])
    return {name for name, _ in build_model(cfg.model).named_parameters()}


@pytest.mark.slow
def test_an_update_with_a_non_finite_gradient_is_skipped(shards, tmp_path):
    """Rank 0's gradient is NaN in steps 3 and 5 (tests/fault_train.py), never twice in a row
    with engine.max_nonfinite=2: those updates leave the fp32 masters as they were on every
    rank, the others move them, and the run finishes."""
    codes, out = train(tmp_path, shards, NONFINITE, script="tests/fault_train.py",
                       env={"CVTKIT_NONFINITE_AT": "3,5"})
    assert codes == [0, 0], out
    assert "finished 8 steps" in out and "not finite" not in out, out
    ckpt = tmp_path / "tiny_cpu/checkpoints"
    states = {s: consolidated_state_dict(ckpt / tag_for(s)) for s in range(2, 7)}
    for name in parameter_names(shards):
        assert torch.equal(states[3][name], states[2][name]), name  # skipped
        assert torch.equal(states[5][name], states[4][name]), name  # skipped
    for before, after in ((3, 4), (5, 6)):  # trained on
        assert any(not torch.equal(states[before][n], states[after][n]) for n in parameter_names(shards))
    flagged = {m["step"]: m["train/nonfinite"] for m in metrics(tmp_path / "tiny_cpu") if "train/nonfinite" in m}
    assert flagged == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1, 6: 0, 7: 0, 8: 0}


@pytest.mark.slow
def test_max_nonfinite_in_a_row_stop_the_run(shards, tmp_path):
    """Rank 0's gradient is NaN in steps 3 and 4, engine.max_nonfinite=2 in a row: the run stops
    at step 4 with one line, exit 1, before saving it; the checkpoint of step 3 stays."""
    codes, out = train(tmp_path, shards, NONFINITE, script="tests/fault_train.py",
                       env={"CVTKIT_NONFINITE_AT": "3,4"})
    assert codes == [1, 1], out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert errors[0].startswith("error: the loss was not finite for 2 consecutive steps (last at step 4, lr "), out
    assert "the last checkpoint (step 3) is intact" in errors[0], out
    assert complete_tags(tmp_path / "tiny_cpu/checkpoints")[-1] == tag_for(3)


def test_entry_point_help_runs():
    out = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout


def test_deepspeed_launcher_argument_is_accepted():
    """`deepspeed pretrain/train.py ...` adds --local_rank; the config is still what is checked."""
    out = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--local_rank=0", "--config",
                          str(TINY_CONFIG), "--set", "optim.lrr=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--set: optim.lrr: unknown key" in out.stderr
