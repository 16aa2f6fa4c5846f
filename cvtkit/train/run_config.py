"""The run config shared by pretraining and fine-tuning: one YAML, validated by these dataclasses.

    cfg = load_config(RunConfig, "configs/pretrain/cvt_13_224_in1k.yaml", ["optim.lr=1e-3"])

Batch identity: `data.batch_size` is the global batch (what the papers quote), and
`global = micro_batch x accumulation x world size`. `engine.micro_batch` is per rank; the
accumulation steps follow from the world size at launch, so a run resumed on another number of
ranks keeps its global batch. The learning rate is the one for the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cvtkit.config_loader import require
from cvtkit.data.config import DataConfig
from cvtkit.models.factory import ModelConfig


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # for the global batch
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    grad_clip: float = 0.0  # max global grad norm; 0: off

    def __post_init__(self):
        require(self.lr > 0, "lr", "a positive learning rate", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.grad_clip >= 0, "grad_clip", ">= 0 (0 turns clipping off)", self.grad_clip)


@dataclass
class ScheduleConfig:
    """Per-step warmup (linear from `warmup_lr`) then cosine to `min_lr` (or constant).
    Length in epochs or steps (exactly one of them); the same for the warmup."""
    kind: Literal["cosine", "constant"] = "cosine"
    epochs: float | None = None
    steps: int | None = None
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # wins over warmup_epochs when set
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def __post_init__(self):
        require((self.epochs is None) != (self.steps is None), "epochs",
                "exactly one of schedule.epochs and schedule.steps", (self.epochs, self.steps))
        require(self.epochs is None or self.epochs > 0, "epochs", "a positive number", self.epochs)
        require(self.steps is None or self.steps > 0, "steps", "a positive number", self.steps)
        require(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)


@dataclass
class EngineConfig:
    """How the model runs: DeepSpeed ZeRO, precision, per-rank micro batch, speed options."""
    zero_stage: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Under bf16: the dtype gradients are all-reduced across ranks and accumulated across
    # micro-batches in. fp32, as DDP under autocast and torchtitan do; bf16 halves the gradient
    # traffic but sums 32 ranks' gradients with 8 bits of mantissa.
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    micro_batch: int | None = None  # per rank; None: the global batch / world size (no accumulation)
    compile: bool = False
    channels_last: bool = False
    dist_timeout_s: int = 600  # collectives give up after this long (a lost rank ends the job)
    seed: int = 0
    max_nonfinite: int = 3  # consecutive non-finite losses before the run stops
    # eval: the model stays in eval() while it trains, as DeiT/CeiT fine-tuning does
    # (docs/recipes.md#ceit-fine-tuning-at-384):
    # BatchNorm keeps its pretrained statistics, drop path and dropout are off.
    train_mode: Literal["train", "eval"] = "train"

    def __post_init__(self):
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3", self.zero_stage)
        require(self.micro_batch is None or self.micro_batch > 0, "micro_batch", "a positive batch",
                self.micro_batch)
        require(self.dist_timeout_s > 0, "dist_timeout_s", "a positive number of seconds",
                self.dist_timeout_s)
        require(self.max_nonfinite >= 1, "max_nonfinite", ">= 1", self.max_nonfinite)
        # DeepSpeed 0.19 has no bf16 optimizer without ZeRO ("unsupported mix of model_dtype=bf16
        # and grad_accum_dtype=fp32"); ZeRO-1 costs nothing extra on one rank.
        require(not (self.zero_stage == 0 and self.precision == "bf16"), "zero_stage",
                "1, 2 or 3 with bf16 (DeepSpeed has no bf16 without ZeRO; or precision fp32)", self.zero_stage)
        # DeepSpeed 0.19 runs ZeRO-1 + bf16 + fp32 gradients through its BF16_Optimizer, whose
        # checkpoints neither zero_to_fp32 nor our resume read back; ZeRO-2 costs no more memory.
        require(not (self.zero_stage == 1 and self.precision == "bf16" and self.grad_reduce_dtype == "fp32"),
                "zero_stage", "2 or 3 with bf16 and fp32 gradient reduction (ZeRO-1 would run DeepSpeed's "
                "BF16_Optimizer, whose checkpoints zero_to_fp32 cannot read; or engine.grad_reduce_dtype=bf16)",
                self.zero_stage)


@dataclass
class EmaConfig:
    decay: float = 0.0  # 0: no EMA
    every_steps: int = 1

    def __post_init__(self):
        require(0 <= self.decay < 1, "decay", "a value in [0, 1) (0 turns EMA off)", self.decay)
        require(self.every_steps >= 1, "every_steps", ">= 1", self.every_steps)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0: only at the end (and on preemption)
    keep: int = 3  # complete checkpoints kept; older ones are deleted once a newer is complete
    resume: Literal["auto", "require", "never"] = "auto"  # auto: resume when the run folder has one
    # End this process at this step as a preemption would (save, exit 75) though the schedule goes
    # on: a run split into time slots, or a resume rehearsal. 0: run to the end.
    stop_at_step: int = 0
    # A resume on another number of ranks converts the checkpoint first (cvtkit.train.reshard);
    # the ranks other than 0 wait this long for it. Convert ahead for checkpoints that take longer.
    convert_timeout_s: int = 3600
    # How often the ranks read what they agreed on (a stop signal, a run of non-finite losses)
    # besides log and save steps: a read waits for the device, so not every step; a signal takes
    # effect within this many steps (a W24 step at 32 GPUs: about 1-2 s, estimated), well inside
    # Slurm's `--signal=USR1@300` and a 30 s preemption grace time.
    signal_check_steps: int = 10

    def __post_init__(self):
        require(self.every_steps >= 0, "every_steps", ">= 0", self.every_steps)
        require(self.signal_check_steps >= 1, "signal_check_steps", ">= 1", self.signal_check_steps)
        require(self.keep >= 1, "keep", ">= 1", self.keep)
        require(self.stop_at_step >= 0, "stop_at_step", ">= 0 (0: run to the end)", self.stop_at_step)
        require(self.convert_timeout_s > 0, "convert_timeout_s", "a positive number of seconds", self.convert_timeout_s)


@dataclass
class LogConfig:
    every_steps: int = 50
    eval_every_steps: int = 0  # 0: evaluate at the end only
    progress: bool = True  # a progress bar on rank 0

    def __post_init__(self):
        require(self.every_steps >= 1, "every_steps", ">= 1", self.every_steps)
        require(self.eval_every_steps >= 0, "eval_every_steps", ">= 0", self.eval_every_steps)


@dataclass
class GuardConfig:
    """What keeps a run going with nobody watching (the recipes' headers give their figures).
    `stall_timeout_s`: a rank whose training loop makes no progress (a step, a validation batch,
    a phase of a save) for this long writes every thread's stack to `RUN/stalls/` and exits with
    `EXIT_STALL`, which the job script requeues; set it well above the longest step, validation
    batch and save phase, and below `engine.dist_timeout_s`, so that a frozen rank is noticed
    before the collectives give up. 0: off.
    `spike_factor`: a step whose training loss (mean over the ranks) or gradient norm exceeds this
    times the median of the `spike_window` steps before it rolls the run back to the newest
    complete checkpoint older than it and skips the batches in between (`guard.py`); at most
    `max_rollbacks` per epoch, then the run stops. 0: off (it reads the loss every step)."""
    stall_timeout_s: float = 300.0
    spike_factor: float = 0.0
    spike_window: int = 50
    max_rollbacks: int = 3

    def __post_init__(self):
        require(self.stall_timeout_s >= 0, "stall_timeout_s", ">= 0 seconds (0 turns the watchdog off)",
                self.stall_timeout_s)
        require(self.spike_factor == 0 or self.spike_factor > 1, "spike_factor",
                "0 (off) or a factor above 1", self.spike_factor)
        require(self.spike_window >= 1, "spike_window", ">= 1 step", self.spike_window)
        require(self.max_rollbacks >= 0, "max_rollbacks", ">= 0 per epoch", self.max_rollbacks)


@dataclass
class InitConfig:
    """Fine-tuning (finetune/finetune.py): the weights to start from and what to do with their
    classifier. synset: each class of the fine-tuning data gets the pretrained row of the same
    synset (a fresh row, with a warning, where there is none); fresh: a new head; keep: the
    pretrained head as it is (same classes)."""
    pretrained: str | None = None  # run folder, DeepSpeed checkpoint, export, official or HF file
    head: Literal["synset", "fresh", "keep"] = "synset"
    use_ema: bool = False  # start from the EMA weights (ema.pt of a run, 'model_ema' of CeiT's)
    # the pretrained classes, when the checkpoint does not list them: a wds folder (its
    # _info.json); official checkpoints of 21,841 or 1,000 rows are taken as sorted synsets
    classes_from: str | None = None


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    schedule: ScheduleConfig
    name: str = "run"
    out_dir: str = "runs"  # the run folder is out_dir/name
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name, "name", "a folder name without '/'", self.name)
