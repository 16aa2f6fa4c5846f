"""Image transforms of the recipes, built with timm and torchvision.

- `deit`: the DeiT recipe (docs/recipes.md#deit-augmentation): bicubic RandomResizedCrop
  (0.08-1), flip, RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25 (pixel mode); Mixup
  0.8 / CutMix 1.0 with label smoothing 0.1 as soft targets (`build_mixup`).
- `finetune`: CvT's fine-tuning transform: resize to (s + 32)^2 then random crop s, flip (416 -> 384).
- evaluation from a model's `EvalConfig` (docs/evaluation.md): resize 256 + centre crop 224 at
  crop ratio 0.875, or a square warp with no crop (CvT at 384).

`train_decoder` is the same DeiT transform from JPEG bytes (`cvtkit.data.jpeg_crop`), which the shard
loaders use: the crop is drawn before decoding, so the decode can be reduced to what it needs. With
`randaugment_on: device` it stops after the flip and hands over RandAugment's draws instead
(`cvtkit.data.randaugment_device`); the trainer's `DeviceBatch` applies them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torchvision import transforms as T

from cvtkit.config_loader import require
from cvtkit.models.factory import IMAGENET_MEAN, IMAGENET_STD, EvalConfig

_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


@dataclass
class AugmentConfig:
    """The `data.augment:` section. Defaults are the DeiT recipe
    (docs/recipes.md#deit-augmentation)."""
    kind: Literal["deit", "finetune", "none"] = "deit"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # ignored by timm when auto_augment is set
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    re_prob: float = 0.25
    re_mode: Literal["pixel", "rand", "const"] = "pixel"
    re_count: int = 1
    finetune_margin: int = 32  # finetune: resize to size + margin, then random crop
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1
    # Where timm's RandAugment runs: in the loader's workers on PIL images, or on the batch's device
    # from draws the workers make (the same draws, the same pixels: cvtkit/data/randaugment_device.py).
    randaugment_on: Literal["cpu", "device"] = "cpu"

    def __post_init__(self):
        require(0 < self.scale[0] <= self.scale[1] <= 1, "scale", "0 < min <= max <= 1", self.scale)
        require(0 < self.ratio[0] <= self.ratio[1], "ratio", "0 < min <= max", self.ratio)
        for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            require(0 <= getattr(self, key) <= 1, key, "a probability in [0, 1]", getattr(self, key))
        require(0 <= self.label_smoothing < 1, "label_smoothing", "a value in [0, 1)", self.label_smoothing)
        require(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha",
                "non-negative mixup and cutmix alphas", (self.mixup_alpha, self.cutmix_alpha))
        if self.randaugment_on == "device":
            require(self.kind == "deit" and str(self.auto_augment).startswith("rand"), "randaugment_on",
                    "cpu unless kind is deit with a rand-... auto_augment", self.randaugment_on)
            from timm.data.auto_augment import rand_augment_transform

            from .randaugment_device import unsupported_ops
            bad = unsupported_ops(rand_augment_transform(self.auto_augment, {}))
            require(not bad, "auto_augment", f"no op the device lacks with randaugment_on: device ({bad})",
                    self.auto_augment)


def train_transform(cfg: AugmentConfig, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    normalize: bool = True):
    """PIL image -> `[3, size, size]` float tensor (normalised), or uint8 when `normalize=False`
    (the GPU then normalises, and random erasing is left to the caller)."""
    if cfg.kind == "deit":
        from timm.data import create_transform
        return create_transform(
            input_size=size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation, mean=mean, std=std, re_prob=cfg.re_prob,
            re_mode=cfg.re_mode, re_count=cfg.re_count, use_prefetcher=not normalize)
    if cfg.kind == "finetune":
        steps = [T.Resize((size + cfg.finetune_margin,) * 2, interpolation=_INTERP["bilinear"]),
                 T.RandomCrop(size), T.RandomHorizontalFlip(cfg.hflip)]
    else:
        steps = [T.Resize((size, size), interpolation=_INTERP[cfg.interpolation])]
    return T.Compose(steps + _to_tensor(mean, std, normalize))


def train_decoder(cfg: AugmentConfig, size: int):
    """JPEG bytes -> uint8 `[3, size, size]` for the DeiT recipe (random erasing and normalisation
    are left to the device), or None for the other kinds (they take PIL images:
    `train_transform`)."""
    if cfg.kind != "deit":
        return None
    from .jpeg_crop import DeitCropDecoder
    if cfg.randaugment_on == "device":
        from .randaugment_device import RandAugmentDraws
        return DeitCropDecoder(cfg.scale, cfg.ratio, cfg.hflip, cfg.interpolation, size,
                               draws=RandAugmentDraws(timm_randaugment(cfg, size)))
    colour = _after_flip(cfg, size)
    return DeitCropDecoder(cfg.scale, cfg.ratio, cfg.hflip, cfg.interpolation, size,
                           colour if colour.transforms else None)


def _after_flip(cfg: AugmentConfig, size: int):
    """The part of timm's DeiT transform after the flip (RandAugment, or colour jitter without it),
    built by timm exactly as in `train_transform`; the crop and flip it builds are not used."""
    from timm.data import create_transform
    _, colour, _ = create_transform(
        input_size=size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation, use_prefetcher=True, separate=True)
    return colour


def timm_randaugment(cfg: AugmentConfig, size: int):
    """timm's RandAugment object of the recipe at `size` (its ops, probabilities, magnitude, fill
    and interpolation), which both halves of `randaugment_on: device` read."""
    from timm.data.auto_augment import RandAugment
    (ra,) = _after_flip(cfg, size).transforms
    assert isinstance(ra, RandAugment), ra
    return ra


def eval_transform(cfg: EvalConfig, normalize: bool = True):
    """The official evaluation transform for `cfg`: PIL -> `[3, S, S]` with S = cfg.input_size."""
    interp = _INTERP[cfg.interpolation]
    if cfg.crop_mode == "center":
        steps = [T.Resize(cfg.resize_size, interpolation=interp), T.CenterCrop(cfg.input_size)]
    elif cfg.crop_mode == "squash":
        steps = [T.Resize((cfg.input_size, cfg.input_size), interpolation=interp)]
    else:
        raise ValueError(f"crop_mode: expected 'center' or 'squash', got {cfg.crop_mode!r}")
    return T.Compose(steps + _to_tensor(cfg.mean, cfg.std, normalize))


def _to_tensor(mean, std, normalize: bool) -> list:
    if normalize:
        return [T.ToTensor(), T.Normalize(mean, std)]
    return [T.PILToTensor()]


def build_mixup(cfg: AugmentConfig, num_classes: int):
    """timm's Mixup/CutMix producing soft targets `[B, num_classes]` (label smoothing inside),
    or None when both alphas are 0 (then use cross entropy with `cfg.label_smoothing`)."""
    if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def normalize_on_device(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `[B, 3, H, W]` (already on the GPU) -> normalised `dtype`, so that only bytes cross
    the PCIe bus."""
    m = torch.tensor(mean, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.to(dtype) - m) / s


def min_decode_side(size: int, cfg: AugmentConfig | None = None, eval_cfg: EvalConfig | None = None) -> int:
    """The smallest shorter side an image may be decoded at without losing pixels the
    transform uses (for reduced-size JPEG decoding).

    Random resized crop: its smallest crop (area `scale[0]`, aspect up to `ratio`) must still
    span `size` pixels, so the shorter side needs `size / sqrt(scale[0] * min(ratio[0], 1/ratio[1]))`.
    """
    if eval_cfg is not None:
        return eval_cfg.resize_size if eval_cfg.crop_mode == "center" else eval_cfg.input_size
    if cfg is None or cfg.kind == "none":
        return size
    if cfg.kind == "finetune":
        return size + cfg.finetune_margin
    narrowest = min(cfg.ratio[0], 1 / cfg.ratio[1])
    return math.ceil(size / math.sqrt(cfg.scale[0] * narrowest))
