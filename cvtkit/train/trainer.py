"""The training loop shared by pretraining and fine-tuning: DeepSpeed from the run config, exact
resume, preemption, validation and logging.

    code = Trainer(cfg).fit()   # 0: finished, EXIT_REQUEUE: stopped by a signal after saving

Step boundaries are the only places where state changes hands: the loader position, RNG states,
EMA and the optimizer are saved there, and every rank agrees there (one all-reduce per step) on
whether to stop for a signal or because the loss is no longer finite.
"""
from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cvtkit.config import save_config
from cvtkit.dist import DistEnv, discover
from cvtkit.models.factory import EvalConfig, build_model, eval_config, weight_decay_groups

from . import data as run_data
from .checkpoint import Checkpointer, ResumeError, any_rank, latest_complete, read_meta
from .config import RunConfig
from .metrics import RunLog, Throughput, device_peak_flops, peak_memory_gib
from .schedule import Schedule

log = logging.getLogger("cvtkit.train")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved after a signal; the launcher requeues (slurm/*.sh)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLoss(RuntimeError):
    pass


class StopSignals:
    """SIGUSR1 / SIGTERM (and SIGUSR2, submitit's) only set a flag here; the loop saves at the next
    step boundary, where all ranks agree. The previous handler of the signal that arrived (submitit's
    requeue, for instance) is kept and called after the save, outside the signal context."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)):
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        for sig in signals:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def chained_handler(self) -> Callable | None:
        handler = self.previous.get(self.received)
        return handler if callable(handler) else None


def git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rng_state() -> dict:
    """Every RNG of this process, as tensors and plain values only, so that it loads with
    `torch.load(weights_only=True)` (no pickled objects in a checkpoint of ours)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    # np.asarray: also the ndarray of checkpoints written before the keys were stored as a tensor
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Ema:
    """An fp32 exponential moving average of the model's floating-point state (params and buffers)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                      if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.state:
                self.state[k].lerp_(v.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)


class Trainer:
    """`prepare_model(model, cfg)` runs on a freshly built model before DeepSpeed wraps it (the
    fine-tuning entry loads pretrained weights there); it is skipped when resuming."""

    def __init__(self, cfg: RunConfig, prepare_model: Callable[[nn.Module, RunConfig], None] | None = None,
                 dist_env: DistEnv | None = None):
        self.cfg = cfg
        self.prepare_model = prepare_model
        self.env = dist_env or discover()
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---------------------------------------------------------------- set-up
    def _init_distributed(self) -> None:
        import deepspeed
        env = self.env
        if env.launcher == "single" and "MASTER_PORT" not in os.environ:
            env = DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")
        env.export()
        self.device = (torch.device("cuda", env.local_rank) if torch.cuda.is_available()
                       else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(seconds=self.cfg.engine.dist_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the machine's cores; oversubscribed OpenMP threads spin for seconds.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", self.world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))

    def _batch_plan(self) -> tuple[int, int]:
        """(micro batch per rank, accumulation steps) for the global batch on this world size."""
        cfg, world = self.cfg, self.world
        micro = cfg.engine.micro_batch or cfg.data.batch_size // world
        if micro == 0 or cfg.data.batch_size % (micro * world):
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is not engine.micro_batch={micro} x "
                             f"accumulation x {world} ranks; choose a global batch divisible by "
                             f"{micro * world} or another engine.micro_batch")
        if cfg.data.augment.kind != "none" and (cfg.data.augment.mixup_alpha > 0 or
                                                cfg.data.augment.cutmix_alpha > 0) and micro % 2:
            raise ValueError(f"engine.micro_batch={micro}: Mixup/CutMix pair images, so the per-rank "
                             f"batch must be even")
        return micro, cfg.data.batch_size // (micro * world)

    def _ds_config(self, micro: int, accum: int, universal: bool) -> dict:
        e, o = self.cfg.engine, self.cfg.optim
        config = {
            "train_batch_size": self.cfg.data.batch_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "gradient_clipping": o.grad_clip,
            "zero_optimization": {"stage": e.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "checkpoint": {"load_universal": universal},
        }
        if e.precision == "bf16":
            # A non-finite gradient skips the update, as fp16's loss scaler does.
            config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        elif e.precision == "fp16":
            config["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000,
                              "hysteresis": 2, "min_loss_scale": 1}
        return config

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = weight_decay_groups(model, o.weight_decay)
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **fused)

    def _check_resume(self, tag: str, micro: int) -> bool:
        """Compare the checkpoint's meta with this config; returns whether the world size changed."""
        meta = read_meta(self.ckpt_dir, tag)
        mine = self._meta(0)
        diffs = [f"{k}: checkpoint {meta.get(k)!r}, config {mine[k]!r}"
                 for k in ("model", "num_classes", "global_batch", "classes_sha", "zero_stage", "precision")
                 if meta.get(k) != mine[k]]
        if diffs:
            raise ResumeError(f"{self.ckpt_dir / tag} contradicts the config ({'; '.join(diffs)}); "
                              f"use another run name, or checkpoint.resume=never to start over in a new folder")
        return meta["world_size"] != self.world

    def _meta(self, step: int) -> dict:
        classes = run_data.dataset_classes(self.cfg.data.train) if self.cfg.data.format == "wds" else None
        import hashlib
        sha = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:16] if classes else None
        return {"step": step, "model": self.cfg.model.name, "num_classes": self.cfg.model.num_classes,
                "global_batch": self.cfg.data.batch_size, "world_size": self.world,
                "zero_stage": self.cfg.engine.zero_stage, "precision": self.cfg.engine.precision,
                "classes_sha": sha, "res": self.cfg.data.res,
                "classes": classes}  # synsets of the head's rows: fine-tuning maps them by synset

    def setup(self) -> None:
        import deepspeed
        cfg = self.cfg
        run_data.check_paths(cfg.data)
        self._init_distributed()
        torch.manual_seed(cfg.engine.seed + self.rank)
        np.random.seed(cfg.engine.seed + self.rank)
        random.seed(cfg.engine.seed + self.rank)
        micro, accum = self._batch_plan()
        self.micro, self.accum = micro, accum

        found = run_data.loader_num_classes(cfg.data)
        if found is not None and found != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.train}/_info.json "
                             f"lists {found} classes")
        tag = latest_complete(self.ckpt_dir) if cfg.checkpoint.resume != "never" else None
        if cfg.checkpoint.resume == "require" and tag is None:
            raise ResumeError(f"checkpoint.resume=require but {self.ckpt_dir} has no complete checkpoint")
        if cfg.checkpoint.resume == "never" and complete_or_partial(self.ckpt_dir):
            raise ResumeError(f"checkpoint.resume=never but {self.ckpt_dir} already holds checkpoints; "
                              f"use another run name")
        universal = self._check_resume(tag, micro) if tag else False

        self.checkpointer = Checkpointer(self.ckpt_dir, self.rank, self.world, cfg.checkpoint.keep)
        if universal:
            self.checkpointer.make_universal(tag)

        model = build_model(cfg.model)
        if self.prepare_model is not None and tag is None:
            self.prepare_model(model, cfg)
        if cfg.engine.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = self._optimizer(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self._ds_config(micro, accum, universal))
        if cfg.engine.compile:
            self.engine.compile()
        self.dtype = _DTYPES[cfg.engine.precision]
        self.ema = Ema(self.engine.module, cfg.ema.decay) if cfg.ema.decay > 0 else None

        self.loader = run_data.train_loader(cfg.data, micro, self.rank, self.world, cfg.engine.seed)
        self.steps_per_epoch = max(1, len(self.loader) // accum)
        self.schedule = Schedule.from_config(cfg.schedule, cfg.optim.lr, self.steps_per_epoch)
        self.batch = run_data.DeviceBatch(cfg.data.augment, cfg.model.num_classes, self.device, self.dtype,
                                          cfg.engine.channels_last)
        self.step = 0
        if tag:
            rank_state, ema_state = self.checkpointer.load(self.engine, tag, universal)
            self.step = read_meta(self.ckpt_dir, tag)["step"]
            set_rng_state(rank_state["rng"])
            self.loader.load_state_dict(rank_state["loader"])
            if self.ema is not None and ema_state is not None:
                self.ema.load_state_dict(ema_state)
            self._info(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            record = {"start": time.time(), "step": self.step, "world_size": self.world,
                      "micro_batch": micro, "accumulation": accum,
                      "git_commit": git_commit(Path(__file__).resolve().parents[2]),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                      "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
            with open(self.run_dir / "starts.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.runlog = RunLog(self.run_dir, self.rank == 0)
        self._info(f"global batch {cfg.data.batch_size} = micro batch {micro} x accumulation {accum} x "
                   f"{self.world} ranks; {self.schedule.total_steps} steps ({self.steps_per_epoch} per "
                   f"epoch); ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}; run folder {self.run_dir}")
        from cvtkit.models.summary import model_macs
        shape = dict(cfg.model.options, **({"img_size": cfg.model.img_size} if cfg.model.img_size else {}))
        self.macs = model_macs(cfg.model.name, cfg.data.res, **shape).total
        self.peak_flops = device_peak_flops(self.device)

    def _info(self, message: str) -> None:
        if self.rank == 0:
            print(f"[cvtkit] {message}", flush=True)

    # ---------------------------------------------------------------- loop
    def _batches(self):
        while True:
            yield from self.loader

    def _agree(self, loss_sum: float, nonfinite: bool, stop: bool) -> tuple[float, bool, bool, int]:
        """One all-reduce per step: the mean loss, whether any rank saw a non-finite loss or a
        stop signal, and the damaged samples skipped by all ranks' loaders so far."""
        damaged = getattr(self.loader, "damaged", 0)
        t = torch.tensor([loss_sum, float(nonfinite), float(stop), float(damaged)], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t[0].item() / self.world, t[1].item() > 0, t[2].item() > 0, int(t[3].item())

    def _save(self) -> None:
        tensors = itertools.chain(self.engine.module.named_parameters(), self.engine.module.named_buffers())
        bad = next((name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if any_rank(bad is not None):  # agreed, or the other ranks would wait in the save
            raise NonFiniteLoss(f"step {self.step}: {bad or 'a tensor on another rank'} is not finite; not "
                                f"saving, the last good checkpoint (step {self.last_saved}) is intact; "
                                f"lower optim.lr")
        rank_state = {"rng": rng_state(), "loader": self.loader.state_dict(), "step": self.step}
        folder = self.checkpointer.save(self.engine, self.step, self._meta(self.step), rank_state,
                                        self.ema.state_dict() if self.ema is not None else None)
        self.last_saved = self.step
        self._info(f"saved {folder}")

    def fit(self) -> int:
        """Train to the end of the schedule; returns 0, or EXIT_REQUEUE after a stop signal."""
        signals = StopSignals()
        try:
            self.setup()
            return self._fit(signals)
        finally:
            signals.restore()
            if getattr(self, "runlog", None) is not None:
                self.runlog.close()

    def _fit(self, signals: StopSignals) -> int:
        cfg, total = self.cfg, self.schedule.total_steps
        self.last_saved = self.step
        self.damaged = 0
        if self.step >= total:
            self._info(f"already complete ({self.step}/{total} steps)")
            return 0
        bar = None
        if cfg.log.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True)
        batches = self._batches()
        meter = Throughput()
        nonfinite_run = 0
        # engine.train_mode=eval: frozen BN statistics and no drop path (DeiT/CeiT fine-tuning)
        self.engine.train(cfg.engine.train_mode == "train")
        while self.step < total:
            lr = self.schedule(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, bad, wait = 0.0, False, 0.0
            for _ in range(self.accum):
                t0 = time.perf_counter()
                images, labels = next(batches)[:2]
                wait += time.perf_counter() - t0
                x, y = self.batch(images, labels)
                loss = self.batch.loss(self.engine(x), y)
                self.engine.backward(loss)
                self.engine.step()
                value = loss.item()
                bad |= not math.isfinite(value)
                loss_sum += value / self.accum if math.isfinite(value) else 0.0
            self.step += 1
            if self.ema is not None and self.step % cfg.ema.every_steps == 0:
                self.ema.update(self.engine.module)
            mean_loss, any_bad, stop, damaged = self._agree(loss_sum, bad, signals.received is not None)
            if damaged > self.damaged:
                self._info(f"step {self.step}: the loaders skipped {damaged - self.damaged} damaged "
                           f"samples or shards ({damaged} in all); training goes on")
                self.damaged = damaged
            stop |= self.step == cfg.checkpoint.stop_at_step
            meter.add(cfg.data.batch_size, wait)
            nonfinite_run = nonfinite_run + 1 if any_bad else 0
            if nonfinite_run >= cfg.engine.max_nonfinite:
                raise NonFiniteLoss(f"the loss was not finite for {nonfinite_run} consecutive steps "
                                    f"(last at step {self.step}, lr {lr:.3g}); the last checkpoint "
                                    f"(step {self.last_saved}) is intact; lower optim.lr or check the data")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if self.step % cfg.log.every_steps == 0 or self.step == total:
                self._log_train(mean_loss, lr, any_bad, meter)
                meter.reset()
            if cfg.log.eval_every_steps and self.step % cfg.log.eval_every_steps == 0 and self.step < total:
                self.evaluate_and_log()
            if stop:
                if self.last_saved != self.step:
                    self._save()
                why = "by signal" if signals.received is not None else "at checkpoint.stop_at_step"
                self._info(f"stopped {why} at step {self.step}/{total}; checkpoint saved, exiting with "
                           f"{EXIT_REQUEUE} to be resumed")
                if bar is not None:
                    bar.close()
                handler = signals.chained_handler()
                if handler is not None:  # e.g. submitit's checkpoint-and-requeue
                    signals.restore()
                    handler(signals.received, None)
                return EXIT_REQUEUE
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self._save()
        if bar is not None:
            bar.close()
        if self.last_saved != self.step:
            self._save()
        self.evaluate_and_log()
        self._info(f"finished {total} steps")
        return 0

    def _log_train(self, loss: float, lr: float, nonfinite: bool, meter: Throughput) -> None:
        speed = meter.read()
        per_gpu = speed["images_per_s"] / self.world
        values = {"train/loss": loss, "train/lr": lr, "train/nonfinite": float(nonfinite),
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

    # ---------------------------------------------------------------- evaluation
    def eval_cfg(self) -> EvalConfig:
        res = self.cfg.data.eval_res or self.cfg.data.res
        try:
            return eval_config(self.engine.module, res)
        except ValueError:
            return EvalConfig(res, 0.875 if res < 384 else 1.0, "center" if res < 384 else "squash")

    def evaluate_and_log(self) -> dict | None:
        if not self.cfg.data.val:
            return None
        metrics = evaluate(self.engine, run_data.eval_loader(
            self.cfg.data.val, self.cfg.data.val_split, self.cfg.data.format, self.eval_cfg(),
            self.cfg.data.eval_batch, self.rank, self.world, self.cfg.data.workers),
            self.device, self.dtype, self.cfg.engine.channels_last, self.eval_cfg().input_size)
        self.runlog.scalars(self.step, {f"val/{k}": v for k, v in metrics.items()})
        self._info(f"step {self.step}: val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} "
                   f"loss {metrics['loss']:.4f} ({int(metrics['count'])} images)")
        return metrics


def complete_or_partial(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(p.name.startswith("step") for p in ckpt_dir.iterdir())


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype,
             channels_last: bool = False, input_size: int = 224) -> dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy over every sample of `loader`, summed across ranks.

    Ranks may hold different numbers of batches; one that runs out keeps stepping with an empty
    batch while others still have data, so that ZeRO-3's gathers stay matched."""
    prep = run_data.DeviceBatch(None, 0, device, dtype, channels_last)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    distributed = dist.is_available() and dist.is_initialized()
    batches = iter(loader)
    shape = (3, input_size, input_size)
    while True:
        batch = next(batches, None)
        if distributed:
            more = torch.tensor([0.0 if batch is None else 1.0],
                                device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(more)
            if more.item() == 0:
                break
        elif batch is None:
            break
        if batch is None:
            x = torch.zeros((1, *shape), dtype=dtype, device=device)
            model(x)
            continue
        x, y = prep(batch[0], batch[1])
        shape = x.shape[1:]
        logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == y[:, None]
        sums += torch.tensor([torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                              hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), len(y)], dtype=torch.float64)
    if distributed:
        t = sums.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        sums = t.cpu()
    model.train(was_training)
    count = max(sums[3].item(), 1)
    return {"top1": 100 * sums[1].item() / count, "top5": 100 * sums[2].item() / count,
            "loss": sums[0].item() / count, "count": sums[3].item()}
