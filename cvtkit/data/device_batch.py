"""The on-device half of the augmentation: uint8 batches from a loader -> model input and targets.

Loaders deliver uint8 `[B, 3, S, S]`, so that only bytes cross to the GPU; `DeviceBatch` then
applies timm's RandAugment where the loader delivered its draws instead (`randaugment_on: device`,
`cvtkit.data.randaugment_device`), normalises, applies random erasing (timm's prefetcher does the
same on the GPU) and Mixup/CutMix, and casts to the engine's dtype and memory format.
"""
from __future__ import annotations

import torch

from .randaugment_device import DeviceRandAugment, RandAugmented
from .transforms import AugmentConfig, build_mixup, normalize_on_device, timm_randaugment


class DeviceBatch:
    """uint8 images and int labels -> `([B, 3, S, S]` in `dtype` on `device`, targets`).

    Training: RandAugment from the draws of a `RandAugmented` batch, normalise, random erasing
    (per image, pixel mode as in DeiT), Mixup/CutMix soft targets `[B, num_classes]` with label
    smoothing (else int labels `[B]`). Evaluation (`augment=None`): normalise only."""

    def __init__(self, augment: AugmentConfig | None, num_classes: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, mean=None, std=None):
        self.device, self.dtype, self.augment = device, dtype, augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean_std = {} if mean is None else {"mean": mean, "std": std}
        self.erase = self.mixup = None
        self.randaugment: dict[int, DeviceRandAugment] = {}  # by image size, built on first use
        if augment is not None and augment.kind != "none":
            if augment.re_prob > 0:
                from timm.data.random_erasing import RandomErasing
                self.erase = RandomErasing(augment.re_prob, mode=augment.re_mode,
                                           max_count=augment.re_count, device=str(device))
            self.mixup = build_mixup(augment, num_classes)
        self.label_smoothing = augment.label_smoothing if augment is not None else 0.0

    def __call__(self, images: torch.Tensor | RandAugmented,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, RandAugmented):
            images = self._randaugment(images)
        x = normalize_on_device(images.to(self.device, non_blocking=True), **self.mean_std)
        y = labels.to(self.device, non_blocking=True)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return x.to(self.dtype).contiguous(memory_format=self.memory_format), y

    def _randaugment(self, batch: RandAugmented) -> torch.Tensor:
        """uint8 `[B, 3, S, S]` on the device, RandAugment applied: the op list of the config and
        size the loader drew with (`timm_randaugment`), so the draws' op indices mean the same ops."""
        assert self.augment is not None and self.augment.randaugment_on == "device", \
            "a batch with RandAugment draws needs the augment config that made them"
        size = batch.images.shape[-1]
        if size not in self.randaugment:
            self.randaugment[size] = DeviceRandAugment(timm_randaugment(self.augment, size))
        return self.randaugment[size](batch.images.to(self.device, non_blocking=True), batch.draws)
