"""The training engine: run config, DeepSpeed loop, checkpoints, schedule, validation, metrics."""
from .run_config import RunConfig
from .trainer import EXIT_REQUEUE, Trainer
from .validation import validate

__all__ = ["RunConfig", "Trainer", "EXIT_REQUEUE", "validate"]
