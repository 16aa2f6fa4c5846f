"""The training loop shared by pretraining and fine-tuning: DeepSpeed from the run config, exact
resume, preemption, validation and logging.

    code = Trainer(cfg).fit()   # 0: finished, EXIT_REQUEUE: stopped by a signal after saving

Step boundaries are the only places where state changes hands: the loader position, RNG states,
EMA and the optimizer are saved there. Every rank agrees on whether to stop for a signal or
because the loss is no longer finite on the steps where the host decides anything (log steps,
saves, the end; `agreement.py`): between those, the step loop reads nothing back from the device.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cvtkit.checkpoint import RUN_CONFIG_FILE, ResumeError, has_tag_folders, latest_complete, read_meta
from cvtkit.config_loader import ConfigError, save_config
from cvtkit.data.device_batch import DeviceBatch
from cvtkit.data.config import RunData
from cvtkit.shards import class_list_sha256
from cvtkit.device import DTYPES, any_rank, collective_device
from cvtkit.dist import DistEnv, discover
from cvtkit.errors import CvtkitError
from cvtkit.models.factory import EvalConfig, build_model, eval_config
from cvtkit.rng import RngState, derived_seed, seed_everything

from .agreement import StepAgreement, StepReport
from .checkpointer import Checkpointer
from .engine import batch_plan, build_optimizer, deepspeed_config, init_distributed
from .loss import classification_loss
from .guard import SpikeGuard, heal
from .metrics import RunLog, Throughput, device_peak_flops, peak_memory_gib, record_start
from .pretrained import load_pretrained_init
from .run_config import RunConfig
from .schedule import Schedule
from .signals import StopSignals
from .reshard import convert_on_start
from .trace import StepTrace
from .state import MasterEma, average_across_ranks, nonfinite_master, persistent_buffers
from .validation import validate
from .watchdog import StallWatchdog

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved after a signal; the launcher requeues (slurm/*.sh)
# What a checkpoint's meta.json must agree on with the config that resumes it (another shape: here, not DeepSpeed's traceback).
_RESUME_KEYS = ("model", "architecture", "num_classes", "global_batch", "classes_sha", "zero_stage", "precision")


class NonFiniteLoss(CvtkitError):
    """The loss (or the weights) stopped being finite; the last good checkpoint is intact."""
    exit_code = 1


class Trainer:
    """`require_pretrained`: a fresh run (no checkpoint to resume) must name `init.pretrained`
    (fine-tuning). `data`: the run's data when it is not read from `cfg.data` (what `RunData.open`
    gives: the training benchmark passes synthetic batches in memory, `cvtkit.bench.recipes`)."""

    def __init__(self, cfg: RunConfig, dist_env: DistEnv | None = None, require_pretrained: bool = False,
                 data: RunData | None = None):
        self.cfg = cfg
        self.env = dist_env or discover()
        self.require_pretrained = require_pretrained
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Everything `setup()` builds, in its order; None until then.
        self.data: RunData | None = data
        self.micro = self.accum = 0
        self.device: torch.device | None = None
        self.rank, self.world = 0, 1
        self.checkpointer: Checkpointer | None = None
        self.engine = self.optimizer = None
        self.eval_cfg: EvalConfig | None = None  # with data.val only
        self.dtype: torch.dtype | None = None
        self.ema: MasterEma | None = None
        self.buffers_to_average: list[torch.Tensor] = []
        self.batch: DeviceBatch | None = None
        self.macs, self.peak_flops = 0, None
        self.loader = None
        self.steps_per_epoch = 0
        self.schedule: Schedule | None = None
        self.runlog: RunLog | None = None
        self.trace: StepTrace | None = None
        self.watchdog: StallWatchdog | None = None  # while `train()` runs, with guard.stall_timeout_s
        self.agreement: StepAgreement | None = None  # likewise: the ranks' per-step sums on the device
        # The loop's counters: `step` is checkpointed (the "trainer" state), the others restart.
        self.step = 0
        self.last_saved, self.damaged, self.nonfinite_run = 0, 0, 0
        self.guard = SpikeGuard(cfg.guard)  # its rollback counts are checkpointed with `step`

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Everything a step needs, in the order that lets bad input fail before any process
        group, model or loader exists."""
        cfg = self.cfg
        tag = self._checkpoint_to_resume()
        self.data = self.data or RunData.open(cfg.data)
        self._check_num_classes()
        self.micro, self.accum = batch_plan(cfg, self.env.world_size)
        universal = self._check_resume(tag) if tag else False
        if universal:  # before the process group: a long conversion meets no collective timeout
            convert_on_start(self.ckpt_dir, tag, self.env.rank, cfg.checkpoint.convert_timeout_s)
        self.device, self.rank, self.world = init_distributed(self.env, cfg.engine.dist_timeout_s)
        seed_everything(cfg.engine.seed + self.rank)
        self.checkpointer = Checkpointer(self.ckpt_dir, self.rank, self.world, cfg.checkpoint.keep)
        self._build_engine(fresh=tag is None, universal=universal)
        self.loader = self.data.train_loader(self.micro, self.rank, self.world, cfg.engine.seed)
        self.steps_per_epoch = max(1, len(self.loader) // self.accum)
        self.schedule = Schedule.from_config(cfg.schedule, cfg.optim.lr, self.steps_per_epoch)
        if tag:
            self._restore(tag, universal)
        self._record_start()
        self.trace = StepTrace(self.run_dir, self.rank, cfg.data.trace, self.step)
        self.runlog = RunLog(self.run_dir, self.rank == 0)
        self._info(f"global batch {cfg.data.batch_size} = micro batch {self.micro} x accumulation "
                   f"{self.accum} x {self.world} ranks; {self.schedule.total_steps} steps "
                   f"({self.steps_per_epoch} per epoch); ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}; "
                   f"run folder {self.run_dir}")

    def _check_num_classes(self) -> None:
        found = self.data.num_classes
        if found is not None and found != self.cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={self.cfg.model.num_classes} but "
                              f"{self.data.train_info.where} lists {found} classes")

    def _checkpoint_to_resume(self) -> str | None:
        """The tag to resume from, by `checkpoint.resume`; for a fresh run, the weights to start
        from must exist."""
        cfg = self.cfg
        tag = latest_complete(self.ckpt_dir) if cfg.checkpoint.resume != "never" else None
        if cfg.checkpoint.resume == "require" and tag is None:
            raise ResumeError(f"checkpoint.resume=require but {self.ckpt_dir} has no complete checkpoint")
        if cfg.checkpoint.resume == "never" and has_tag_folders(self.ckpt_dir):
            raise ResumeError(f"checkpoint.resume=never but {self.ckpt_dir} already holds checkpoints; "
                              f"use another run name")
        if tag is None and self.require_pretrained and not cfg.init.pretrained:
            raise ConfigError("init.pretrained: expected the weights to fine-tune "
                              "(--pretrained PATH or --set init.pretrained=PATH)")
        if tag is None and cfg.init.pretrained and not Path(cfg.init.pretrained).exists():
            raise ConfigError(f"init.pretrained: {cfg.init.pretrained}: no such file or folder")
        return tag

    def _check_resume(self, tag: str) -> bool:
        """Compare the checkpoint's meta with this config; returns whether it needs converting for
        this number of ranks (ZeRO-0 keeps whole states, which any number of ranks loads)."""
        meta = read_meta(self.ckpt_dir / tag)
        mine = self._meta(0)
        diffs = [f"{k}: checkpoint {meta.get(k)!r}, config {mine[k]!r}" for k in _RESUME_KEYS if meta.get(k) != mine[k]]
        if diffs:
            raise ResumeError(f"{self.ckpt_dir / tag} contradicts the config ({'; '.join(diffs)}); "
                              f"use another run name, or checkpoint.resume=never to start over in a new folder")
        return meta["world_size"] != self.env.world_size and meta["zero_stage"] > 0

    def _meta(self, step: int) -> dict:
        synsets = self.data.synsets
        return {"step": step, "model": self.cfg.model.name, "architecture": self.cfg.model.architecture(),
                "num_classes": self.cfg.model.num_classes,
                "global_batch": self.cfg.data.batch_size, "world_size": self.env.world_size,
                "zero_stage": self.cfg.engine.zero_stage, "precision": self.cfg.engine.precision,
                "classes_sha": class_list_sha256(synsets) if synsets else None, "res": self.cfg.data.res,
                "eval_res": self.cfg.data.eval_size, "classes": synsets}  # synsets of the head's rows: fine-tuning maps them by synset

    def _build_engine(self, fresh: bool, universal: bool) -> None:
        """The model (with `init.pretrained` on a fresh run), DeepSpeed around it, the EMA, and
        what each step and validation need."""
        import deepspeed

        from cvtkit.models.summary import model_macs
        cfg = self.cfg
        model = build_model(cfg.model)
        if cfg.data.val:  # a size the model cannot be evaluated at fails now, not after training
            self.eval_cfg = eval_config(model, cfg.data.eval_size)
        if fresh and cfg.init.pretrained:
            load_pretrained_init(model, cfg.init, self.data.synsets, self.run_dir, self.rank, self.world)
        if cfg.engine.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg, self.device),
            config=deepspeed_config(cfg, self.micro, self.accum, universal))
        if cfg.engine.compile:
            self.engine.compile()
        self.dtype = DTYPES[cfg.engine.precision]
        self.ema = MasterEma(self.engine.module, cfg.ema.decay) if cfg.ema.decay > 0 else None
        self.buffers_to_average = [b for _, b in persistent_buffers(self.engine.module) if b.is_floating_point()]
        self.batch = DeviceBatch(cfg.data.augment, cfg.model.num_classes, self.device, self.dtype,
                                 cfg.engine.channels_last)
        self.macs = model_macs(cfg.model.name, cfg.data.res, **cfg.model.architecture()).total
        self.peak_flops = device_peak_flops(self.device)

    def _states(self) -> dict:
        """Everything a checkpoint holds, by the names `cvtkit.checkpoint` files them under."""
        return {"model": self.engine, "rng": RngState(), "loader": self.loader, "trainer": self,
                "ema": self.ema}

    def state_dict(self) -> dict:
        """The loop's own state (the "trainer" entry of a checkpoint)."""
        return {"step": self.step, "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.guard.load_state_dict(state.get("guard", {}))  # none in checkpoints from before the guard

    def _restore(self, tag: str, universal: bool) -> None:
        """Model, optimizer, RNG, loader position, step and EMA from `tag`. After
        a world-size change, a rank the checkpoint has no state for (more ranks than it was saved
        with) takes rank 0's loader position and a fresh random stream of its own, derived from
        (seed, rank, step): reusing rank 0's would repeat its drop-path masks, Mixup and erasing."""
        missing = self.checkpointer.load(tag, self._states(), universal)
        if "rng" in missing:
            seed_everything(derived_seed(self.cfg.engine.seed, self.rank, self.step))
        if "ema" in missing and self.ema is not None:  # ema.decay was 0 when the checkpoint was saved
            self.ema = MasterEma(self.engine.module, self.cfg.ema.decay)
            self._info(f"{self.ckpt_dir / tag} has no EMA: the EMA starts from the weights of step {self.step}")
        self._info(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    def _record_start(self) -> None:
        """The resolved config, and one line per start in `starts.jsonl` (rank 0)."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / RUN_CONFIG_FILE)
        record_start(self.run_dir, {
            "step": self.step, "world_size": self.world, "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "micro_batch": self.micro, "accumulation": self.accum})

    def _info(self, message: str) -> None:
        if self.rank == 0:
            print(f"[cvtkit] {message}", flush=True)

    # ---------------------------------------------------------------- loop
    def fit(self) -> int:
        """Train to the end of the schedule; returns 0, or EXIT_REQUEUE after a stop signal."""
        signals = StopSignals()
        try:
            self.setup()
            return self.train(signals)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            signals.restore()
            if self.runlog is not None:
                self.runlog.close()

    def train(self, signals: StopSignals) -> int:
        cfg, total = self.cfg, self.schedule.total_steps
        self.last_saved = self.step
        if self.step >= total:
            self._info(f"already complete ({self.step}/{total} steps)")
            return 0
        bar = tqdm(total=total, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                   disable=not (cfg.log.progress and self.rank == 0))
        batches = self._batches()
        meter = Throughput()
        self.agreement = StepAgreement(collective_device(), len(signals.signals))
        self.watchdog = StallWatchdog(cfg.guard.stall_timeout_s, self.run_dir, self.rank)
        self.checkpointer.progress = self.watchdog.progress
        self.watchdog.start()
        self.engine.train(cfg.engine.train_mode == "train")  # eval: frozen BN, no drop path (DeiT/CeiT fine-tuning)
        while self.step < total:
            lr = self.schedule(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            data_wait = self._train_step(batches, signals)
            self.watchdog.progress(f"step {self.step}")
            if self.guard.on and heal(self):  # rolled back past a loss spike: batches from the new position
                batches = self._batches()
                continue
            meter.add(cfg.data.batch_size, data_wait)
            bar.update(1)
            log = self.step % cfg.log.every_steps == 0 or self.step == total
            if not (log or self._decides()):  # nothing to decide: queue the next step without waiting
                continue
            report = self.agreement.read(new_window=log)
            signal = signals.agreed(report.signal_flags)
            stop = signal is not None or self.step == cfg.checkpoint.stop_at_step
            self._check_health(report, lr)
            bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{lr:.2e}")
            if log:
                self._log_train(report, lr, meter)
                meter.reset()
            if cfg.log.eval_every_steps and self.step % cfg.log.eval_every_steps == 0 and self.step < total:
                self.validate()
            if self._should_save(stop):
                self._save()
            if stop:
                bar.close()
                why = "by signal" if signal is not None else "at checkpoint.stop_at_step"
                self._info(f"stopped {why} at step {self.step}/{total}; checkpoint saved, exiting with "
                           f"{EXIT_REQUEUE} to be resumed")
                signals.hand_over(signal)  # e.g. submitit's checkpoint-and-requeue
                return EXIT_REQUEUE
        bar.close()
        self.validate()
        self._info(f"finished {total} steps")
        return 0

    def _batches(self):
        while True:
            yield from self.loader

    def _train_step(self, batches, signals: StopSignals) -> float:
        """One optimizer step over `accum` micro-batches and the ranks' agreement on it, without
        reading anything back from the device; returns the seconds spent waiting for data."""
        data_wait = 0.0
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            images, labels = batch[:2]
            self.trace.add(batch)
            x, y = self.batch(images, labels)
            loss = classification_loss(self.engine(x), y, self.batch.label_smoothing)
            self.engine.backward(loss)
            self.engine.step()
            self.agreement.add_loss(loss)
        self.step += 1
        self.trace.end_step(self.step)
        average_across_ranks(self.buffers_to_average)
        if self.ema is not None and self.step % self.cfg.ema.every_steps == 0:
            self.ema.update(self.engine.module)
        self.agreement.end_step(self.step, signals.flags(), getattr(self.loader, "damaged", 0))
        return data_wait

    def _decides(self) -> bool:
        """Whether the host reads the ranks' agreement after this step besides logging: a save,
        `checkpoint.stop_at_step`, and every `checkpoint.signal_check_steps` (a stop signal or a
        run of non-finite losses acts at the next such step, on every rank alike)."""
        ckpt = self.cfg.checkpoint
        return (self.step == ckpt.stop_at_step or self.step % ckpt.signal_check_steps == 0
                or self._should_save(False))

    def _check_health(self, report: StepReport, lr: float) -> None:
        """Damaged data is reported and training goes on; a run of non-finite losses stops it."""
        if report.damaged > self.damaged:
            self._info(f"step {self.step}: the loaders skipped {report.damaged - self.damaged} damaged "
                       f"samples or shards ({report.damaged} in all); training goes on")
            self.damaged = report.damaged
        if report.nonfinite_steps:  # skipped updates, in events.jsonl beside the guard's rollbacks
            self.runlog.event("nonfinite", {"step": self.step, "steps": report.nonfinite_steps,
                                            "longest_run": report.nonfinite_run})
        if report.nonfinite_run >= self.cfg.engine.max_nonfinite:
            raise NonFiniteLoss(f"the loss was not finite for {report.nonfinite_run} consecutive steps "
                                f"(last at step {report.nonfinite_last}, lr {lr:.3g} at step {self.step}); "
                                f"the last checkpoint (step {self.last_saved}) is intact; lower optim.lr "
                                f"or check the data")

    def _should_save(self, stop: bool) -> bool:
        """The one place that decides: on a stop, at the end of the schedule, and every
        `checkpoint.every_steps`; never twice for one step."""
        every = self.cfg.checkpoint.every_steps
        due = stop or self.step == self.schedule.total_steps or (every > 0 and self.step % every == 0)
        return due and self.last_saved != self.step

    def _save(self) -> None:
        module = self.engine.module
        # The fp32 masters, not the working copy: under ZeRO-3 the parameters are empty placeholders.
        bad = nonfinite_master(module) or next((name for name, b in module.named_buffers()
                                                if b.is_floating_point() and not torch.isfinite(b).all()), None)
        if any_rank(bad is not None):  # agreed, or the other ranks would wait in the save
            raise NonFiniteLoss(f"step {self.step}: {bad or 'a tensor on another rank'} is not finite; not "
                                f"saving, the last good checkpoint (step {self.last_saved}) is intact; "
                                f"lower optim.lr")
        folder = self.checkpointer.save(self.step, self._states(), self._meta(self.step))
        self.last_saved = self.step
        self._info(f"saved {folder}")

    def _log_train(self, report: StepReport, lr: float, meter: Throughput) -> None:
        """`train/loss` is the mean over the steps since the last log step, `train/nonfinite` the
        number of them with a non-finite loss."""
        speed = meter.read()
        per_gpu = speed["images_per_s"] / self.world
        values = {"train/loss": report.loss, "train/lr": lr, "train/nonfinite": float(report.nonfinite_steps),
                  "perf/images_per_s": speed["images_per_s"], "perf/images_per_s_per_gpu": per_gpu,
                  "perf/step_s": speed["step_s"], "perf/data_wait_fraction": speed["data_wait_fraction"],
                  "mem/peak_gib": peak_memory_gib(self.device), "train/epoch": self.step / self.steps_per_epoch,
                  "data/damaged": float(self.damaged)}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            values["train/grad_norm"] = float(grad_norm)
        if self.peak_flops:
            values["perf/mfu"] = 6 * self.macs * per_gpu / self.peak_flops
        self.runlog.scalars(self.step, values)

    # ---------------------------------------------------------------- validation
    def validate(self) -> dict | None:
        """Every validation sample once across ranks, logged as `val/*`; None without `data.val`."""
        if not self.cfg.data.val:
            return None
        loader = self.data.val_loader(self.eval_cfg, self.rank, self.world)
        metrics = validate(self.engine, loader, self.device, self.dtype, self.cfg.engine.channels_last,
                           self.eval_cfg.input_size, progress=self.watchdog.progress)
        self.runlog.scalars(self.step, {f"val/{k}": v for k, v in metrics.items()})
        self._info(f"step {self.step}: val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} "
                   f"loss {metrics['loss']:.4f} ({int(metrics['count'])} images, {self.cfg.engine.precision})")
        return metrics

