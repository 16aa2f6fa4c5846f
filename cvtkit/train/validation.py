"""Top-1 / top-5 and cross entropy over every sample of a validation loader, summed across ranks;
used by the trainer and by `finetune/evaluate.py`, so that both score a checkpoint the same way."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cvtkit.data.device_batch import DeviceBatch
from cvtkit.device import any_rank, collective_device


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype,
             channels_last: bool = False, input_size: int = 224,
             progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """`{"top1", "top5"}` (%), `"loss"` (mean cross entropy) and `"count"` over every sample of
    `loader` (uint8 `[B, 3, S, S]` and labels `[B]`), summed across ranks.

    Ranks may hold different numbers of batches; one that runs out keeps stepping with an empty
    batch while others still have data, so that ZeRO-3's gathers stay matched. `progress` is
    called after each batch (the trainer's stall watchdog)."""
    prep = DeviceBatch(None, 0, device, dtype, channels_last)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    distributed = dist.is_available() and dist.is_initialized()
    batches = iter(loader)
    shape = (3, input_size, input_size)
    while True:
        if progress is not None:
            progress("a validation batch")
        batch = next(batches, None)
        if distributed and not any_rank(batch is not None):
            break
        if not distributed and batch is None:
            break
        if batch is None:
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
            continue
        x, y = prep(batch[0], batch[1])
        shape = x.shape[1:]
        logits = model(x).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), hit[:, 0].sum().item(),
                              hit.any(dim=1).sum().item(), len(y)], dtype=torch.float64)
    if distributed:
        t = sums.to(collective_device())
        dist.all_reduce(t)
        sums = t.cpu()
    model.train(was_training)
    count = max(sums[3].item(), 1)
    return {"top1": 100 * sums[1].item() / count, "top5": 100 * sums[2].item() / count,
            "loss": sums[0].item() / count, "count": sums[3].item()}

