"""The classification losses of training and of the benchmark."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: `[B, K]` logits and `[B, K]` target distributions (Mixup's)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Soft-target cross entropy for `[B, K]` targets (after Mixup, smoothing already inside), else
    cross entropy on int labels `[B]` with `label_smoothing`; computed in fp32."""
    if targets.ndim == 2:
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
