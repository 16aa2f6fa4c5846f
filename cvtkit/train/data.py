"""Loaders of a run (webdataset shards or ffcv files) and the on-device half of the augmentation.

Loaders deliver uint8 `[B, 3, S, S]`, so that only bytes cross to the GPU; `DeviceBatch` then
normalises, applies random erasing (timm's prefetcher does the same on the GPU) and Mixup/CutMix,
and casts to the engine's dtype and memory format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cvtkit.data.transforms import (AugmentConfig, build_mixup, eval_transform, min_decode_side,
                                    normalize_on_device, train_transform)
from cvtkit.models.factory import EvalConfig

from .config import DataConfig


def dataset_classes(path: str, split: str = "train") -> list[str] | None:
    """The synsets of a webdataset folder's `_info.json` (index order), or None where unknown."""
    info = Path(path) / "_info.json"
    if not info.is_file():
        return None
    classes = json.loads(info.read_text()).get("classes")
    if not classes:
        return None
    return [c["synset"] if isinstance(c, dict) else c for c in classes]


def check_paths(cfg: DataConfig) -> None:
    """One-line errors for missing data, before any process group or model is built."""
    for key in ("train", "val"):
        path = getattr(cfg, key)
        if path is None or "://" in path:
            continue
        p = Path(path)
        if cfg.format == "ffcv":
            if not p.is_file():
                raise FileNotFoundError(f"data.{key}: {path}: no such .beton file")
        elif not p.is_dir():
            raise FileNotFoundError(f"data.{key}: {path}: no such shard folder")
        elif not (p / "_info.json").is_file():
            raise FileNotFoundError(f"data.{key}: {path}: no _info.json (make shards with "
                                    f"data_prep/make_shards.py)")


def train_loader(cfg: DataConfig, micro_batch: int, rank: int, world_size: int, seed: int):
    if cfg.format == "ffcv":
        from cvtkit.data.ffcv_loader import FfcvLoader
        return FfcvLoader(cfg.train, micro_batch, cfg.res, rank, world_size, cfg.workers, seed,
                          train=True, augment=cfg.augment)
    from cvtkit.data.wds_loader import ShardSet, WdsLoader
    shards = ShardSet.from_info(cfg.train, cfg.train_split)
    return WdsLoader(shards, micro_batch, rank, world_size, cfg.workers, seed,
                     transform=train_transform(cfg.augment, cfg.res, normalize=False), train=True,
                     shuffle_buffer=cfg.shuffle_buffer,
                     decode_min_side=min_decode_side(cfg.res, cfg.augment))


def eval_loader(path: str, split: str, fmt: str, eval_cfg: EvalConfig, batch: int, rank: int,
                world_size: int, workers: int):
    """Each sample once across ranks, with the official evaluation transform of `eval_cfg`."""
    if fmt == "ffcv":
        # The stored images through PIL and the official transform: ffcv's decoders resize with
        # OpenCV and cannot warp to a square (CvT at 384), see eval_data.
        from .eval_data import beton_eval_loader
        return beton_eval_loader(path, eval_cfg, batch, rank, world_size, workers)
    from cvtkit.data.wds_loader import ShardSet, WdsLoader
    shards = ShardSet.from_info(path, split)
    return WdsLoader(shards, batch, rank, world_size, workers, transform=eval_transform(eval_cfg, normalize=False),
                     train=False, decode_min_side=min_decode_side(eval_cfg.input_size, eval_cfg=eval_cfg))


def loader_num_classes(cfg: DataConfig) -> int | None:
    if cfg.format == "wds" and "://" not in cfg.train:
        from cvtkit.data.wds_loader import ShardSet
        return ShardSet.from_info(cfg.train, cfg.train_split).num_classes
    return None


class DeviceBatch:
    """uint8 images and int labels from a loader -> model input and targets on `device`.

    Training: normalise, random erasing (per image, pixel mode as in DeiT), Mixup/CutMix soft
    targets `[B, num_classes]` with label smoothing. Evaluation: normalise only."""

    def __init__(self, augment: AugmentConfig | None, num_classes: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, mean=None, std=None):
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean_std = {} if mean is None else {"mean": mean, "std": std}
        self.erase = self.mixup = None
        if augment is not None and augment.kind != "none":
            if augment.re_prob > 0:
                from timm.data.random_erasing import RandomErasing
                self.erase = RandomErasing(augment.re_prob, mode=augment.re_mode,
                                           max_count=augment.re_count, device=str(device))
            self.mixup = build_mixup(augment, num_classes)
        self.label_smoothing = augment.label_smoothing if augment is not None else 0.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_on_device(images.to(self.device, non_blocking=True), **self.mean_std)
        y = labels.to(self.device, non_blocking=True)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return x.to(self.dtype).contiguous(memory_format=self.memory_format), y

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross entropy after Mixup, else cross entropy with label smoothing."""
        logits = logits.float()
        if targets.ndim == 2:
            return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()
        return torch.nn.functional.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
