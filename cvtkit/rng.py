"""The random number generators of a process, captured, restored and seeded in one place: the
trainer checkpoints them, the loaders seed them per sample (timm's augmentations draw from
Python's `random`, numpy and torch).

    RngState().state_dict()        # every RNG, as tensors and plain values (weights_only loads it)
    with sample_seeded(seed): ...  # the host RNGs seeded for one sample, put back afterwards
"""
from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np
import torch


def host_states() -> tuple:
    """Python's, numpy's and torch's CPU RNG states as they are (cheap: per sample)."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_host_states(states: tuple) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def seed_host(seed: int) -> None:
    """Seed Python's, numpy's and torch's CPU RNG. The CPU generator only: `torch.manual_seed`
    also queues a CUDA seeding with its stack trace (about 1 ms, measured) and would reseed the
    trainer's CUDA RNG where a loader runs in the trainer's process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def host_seeded(seed: int | None, restore: bool):
    """Seed the host RNGs with `seed` for the block (None: leave them alone); with `restore`,
    put the states from before back afterwards (a loader in the trainer's own process)."""
    if seed is None:
        yield
        return
    saved = host_states() if restore else None
    seed_host(seed)
    try:
        yield
    finally:
        if saved is not None:
            set_host_states(saved)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed of its own for (seed, rank, step): a rank that joins a resumed run starts a stream
    no other rank draws from."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:4], "little")


class RngState:
    """Every RNG of this process as checkpoint state: tensors and plain values only, so that it
    loads with `torch.load(weights_only=True)` (no pickled objects in a checkpoint of ours)."""

    def state_dict(self) -> dict:
        python, (kind, keys, pos, has_gauss, gauss), cpu = host_states()
        state = {"python": python, "torch": cpu,
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        set_host_states((state["python"], (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
                         state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
