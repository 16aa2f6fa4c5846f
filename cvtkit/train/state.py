"""Per-process training state saved with a checkpoint: the RNG states and the EMA of the weights."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn


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
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
