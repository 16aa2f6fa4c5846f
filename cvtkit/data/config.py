"""The loaders of a run, from its `data:` section: webdataset shards (`wds`: WdsLoader; `dali`:
NVIDIA DALI, on the GPU where there is one) or ffcv files for training, and each validation
sample once across ranks (for `dali` through WdsLoader and PIL, pixel-exact to the official
evaluation). Loaders deliver uint8 `[B, 3, S, S]` with labels;
`cvtkit.data.device_batch` does the rest on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cvtkit.config_loader import require
from cvtkit.models.factory import EvalConfig

from cvtkit.shards import ShardFolderError, ShardInfo, ShardSet, has_info
from .transforms import AugmentConfig, eval_transform, min_decode_side, train_decoder, train_transform


@dataclass
class DataConfig:
    """Where the images are and how they are batched (the `data:` section of a run config)."""
    format: Literal["wds", "ffcv", "dali"] = "wds"
    train: str = ""  # wds, dali: a shard folder with _info.json or info.json (wds: or URL prefix); ffcv: a .beton file
    train_split: str = "train"
    val: str | None = None  # as `train`; None: no validation
    val_split: str = "validation"
    res: int = 224
    eval_res: int | None = None  # None: `res`
    batch_size: int = 256  # global
    eval_batch: int = 64  # per rank
    workers: int = 4  # per rank
    shuffle_buffer: int = 2000  # raw samples per slot (wds, dali)
    # wds: the virtual slots of the sample order (`cvtkit.data.slots`); 0: the checkpoint's, or for
    # a fresh run as many as divide the global batch up to 256 and the shard count, at least one
    # per micro-batch
    slots: int = 0
    # wds: show each training sample this many times per epoch, each copy with its own augmentation
    # on another rank (DeiT's repeated augmentation, `cvtkit.data.slots`); the epoch keeps its
    # steps, so it shows 1/repeated_aug of the samples. 1: off
    repeated_aug: int = 1
    trace: bool = False  # write RUN/trace.jsonl: the sample keys of every optimizer step (rank 0)
    # Validation decodes large JPEGs at a reduced DCT scale: faster, not pixel-exact to the
    # official full decode + resize (docs/evaluation.md).
    eval_reduced_decode: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        require(bool(self.train), "train", "a shard folder or .beton path", self.train)
        require(self.res > 0, "res", "a positive resolution", self.res)
        require(self.batch_size > 0, "batch_size", "a positive global batch", self.batch_size)
        require(self.eval_batch > 0, "eval_batch", "a positive batch", self.eval_batch)
        require(self.workers >= 0, "workers", ">= 0", self.workers)
        # Only the webdataset loader's decoder hands RandAugment's draws over to the device.
        require(self.format == "wds" or self.augment.randaugment_on == "cpu", "format",
                "wds with augment.randaugment_on: device", self.format)
        require(self.slots >= 0, "slots", ">= 0 (0: the default layout)", self.slots)
        require(self.repeated_aug >= 1, "repeated_aug", ">= 1 (1: off)", self.repeated_aug)
        # ffcv and DALI deal each epoch's samples by rank: they have no place to put the copies
        require(self.format == "wds" or self.repeated_aug == 1, "repeated_aug",
                f"1 with data.format {self.format} (only wds repeats samples)", self.repeated_aug)

    @property
    def eval_size(self) -> int:
        """The resolution validation runs at: `eval_res`, else the training `res`. Recorded in a
        checkpoint's meta as `eval_res`, where evaluation and export read it."""
        return self.eval_res or self.res


@dataclass(frozen=True)
class RunData:
    """What a run's data folders say, read once per start: the split metadata of the training
    and validation shards (None for ffcv files), the training split and its classes."""
    cfg: DataConfig
    train_info: ShardInfo | None
    val_info: ShardInfo | None
    synsets: list[str] | None  # training class index -> synset, where known
    train_shards: ShardSet | None = None

    @classmethod
    def open(cls, cfg: DataConfig) -> "RunData":
        """One-line errors for missing data, before any process group or model is built."""
        if cfg.format == "ffcv":
            for key in ("train", "val"):
                path = getattr(cfg, key)
                if path is not None and not Path(path).is_file():
                    raise ShardFolderError(f"data.{key}: {path}: no such .beton file")
            beside = Path(cfg.train).parent
            synsets = ShardInfo.read(str(beside)).synsets if has_info(beside) else None
            return cls(cfg, None, None, synsets)
        train = _read(cfg.train, "train")
        if cfg.format == "dali" and not train.is_local:
            raise ShardFolderError(f"data.train: {cfg.train}: data.format dali reads local shard folders only")
        val = None if cfg.val is None else (train if cfg.val == cfg.train else _read(cfg.val, "val"))
        shards = train.split(cfg.train_split)  # a missing split or shard fails here, not in a worker
        if cfg.format == "dali":
            from .dali_loader import check_labels
            check_labels(shards)
        if val is not None:
            _check_same_classes(shards, val.split(cfg.val_split), cfg)
        return cls(cfg, train, val, shards.synsets, shards)

    @property
    def num_classes(self) -> int | None:
        return self.train_shards.num_classes if self.train_shards is not None else None

    def train_loader(self, micro_batch: int, rank: int, world_size: int, seed: int):
        cfg = self.cfg
        if cfg.format == "ffcv":
            from .ffcv_loader import FfcvLoader
            return FfcvLoader(cfg.train, micro_batch, cfg.res, rank, world_size, cfg.workers, seed,
                              train=True, augment=cfg.augment)
        shards = self.train_shards
        if cfg.format == "dali":
            from .dali_loader import DaliLoader
            return DaliLoader(shards, micro_batch, cfg.res, rank, world_size, cfg.workers, seed,
                              augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer)
        from .wds_loader import WdsLoader
        decoder = train_decoder(cfg.augment, cfg.res)  # the DeiT recipe straight from JPEG bytes
        order = dict(global_batch=cfg.batch_size, slots=cfg.slots, with_keys=cfg.trace, repeated_aug=cfg.repeated_aug)
        if decoder is not None:
            return WdsLoader(shards, micro_batch, rank, world_size, cfg.workers, seed, transform=decoder,
                             train=True, shuffle_buffer=cfg.shuffle_buffer, **order)
        return WdsLoader(shards, micro_batch, rank, world_size, cfg.workers, seed,
                         transform=train_transform(cfg.augment, cfg.res, normalize=False), train=True,
                         shuffle_buffer=cfg.shuffle_buffer, decode_min_side=min_decode_side(cfg.res, cfg.augment),
                         **order)

    def val_loader(self, eval_cfg: EvalConfig, rank: int, world_size: int):
        cfg = self.cfg
        if cfg.format == "ffcv":
            return eval_loader_beton(cfg.val, eval_cfg, cfg.eval_batch, rank, world_size, cfg.workers)
        return eval_loader_wds(self.val_info, cfg.val_split, eval_cfg, cfg.eval_batch, rank, world_size,
                               cfg.workers, reduced_decode=cfg.eval_reduced_decode)


def _check_same_classes(train: ShardSet, val: ShardSet, cfg: DataConfig) -> None:
    """Validation labels index the training classes (the hub's 22k folder: `train` goes with
    `validation`, `train_12k` with `validation_12k`)."""
    if train.synsets is not None and val.synsets is not None and train.synsets != val.synsets:
        raise ShardFolderError(f"data.val_split {cfg.val_split!r} of {cfg.val} labels {len(val.synsets)} classes, "
                               f"not the {len(train.synsets)} of data.train_split {cfg.train_split!r}")


def _read(path: str, key: str) -> ShardInfo:
    try:
        return ShardInfo.read(path)
    except ShardFolderError as e:
        raise ShardFolderError(f"data.{key}: {e}") from None


def eval_loader_wds(info: ShardInfo, split: str, eval_cfg: EvalConfig, batch: int, rank: int,
                    world_size: int, workers: int, reduced_decode: bool = False):
    """Each sample of a shard split once across ranks, with the official transform of `eval_cfg`:
    a full-size decode, then resize and crop, as the official PIL pipeline (pixel-exact). With
    `reduced_decode`, large JPEGs are decoded at a reduced DCT scale (faster, not pixel-exact)."""
    from .wds_loader import WdsLoader
    min_side = min_decode_side(eval_cfg.input_size, eval_cfg=eval_cfg) if reduced_decode else 0
    return WdsLoader(info.split(split), batch, rank, world_size, workers,
                     transform=eval_transform(eval_cfg, normalize=False), train=False,
                     decode_min_side=min_side)


def eval_loader_beton(path: str, eval_cfg: EvalConfig, batch: int, rank: int, world_size: int, workers: int):
    """The stored images of a `.beton` through PIL and the official transform: ffcv's decoders
    resize with OpenCV and cannot warp to a square (CvT at 384), see `eval_sets`."""
    from .eval_sets import beton_eval_loader
    return beton_eval_loader(path, eval_cfg, batch, rank, world_size, workers)
