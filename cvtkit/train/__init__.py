"""The training engine: run config, DeepSpeed loop, checkpoints, schedule, metrics."""
from .config import RunConfig
from .trainer import EXIT_REQUEUE, Trainer, evaluate

__all__ = ["RunConfig", "Trainer", "EXIT_REQUEUE", "evaluate"]
