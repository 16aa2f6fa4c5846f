"""The learning rate as a function of the optimizer step (so the schedule's state is the step)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .run_config import ScheduleConfig


@dataclass(frozen=True)
class Schedule:
    """Linear warmup from `warmup_lr` to `peak` over `warmup_steps`, then cosine (counted from the
    end of the warmup) down to `min_lr` at `total_steps`, or constant at `peak`."""
    peak: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float
    kind: str = "cosine"

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, peak: float, steps_per_epoch: int) -> "Schedule":
        total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
        return cls(peak, total, min(warmup, total), cfg.warmup_lr, cfg.min_lr, cfg.kind)

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * t))
