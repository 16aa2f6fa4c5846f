"""Fine-tuning 22k -> 1k at 384, evaluation and export (the library half of finetune/*.py)."""
from .pretrained import init_from_pretrained, initial_state

__all__ = ["init_from_pretrained", "initial_state"]
