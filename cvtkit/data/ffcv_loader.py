"""ffcv loaders over `.beton` files, with the same rank/epoch/resume contract as `WdsLoader`.

ffcv's own distributed order pads with duplicates (DistributedSampler, drop_last=False) and
needs a process group; here each rank computes its indices itself and hands them, epoch by
epoch, to one ffcv Loader built (and compiled) once per run:
- training: a permutation by (seed, epoch), cut to a multiple of world_size x batch_size, rank r
  taking every world_size-th; a resumed epoch starts after the batches already delivered, which
  are therefore never decoded; the order is dealt by rank, so another world size or batch is
  refused with one line (`position.resume_position`);
- evaluation: indices r, r + world_size, ... in file order: each sample exactly once.
Pipelines use what ffcv offers of the recipes: random resized crop + flip for training (no
RandAugment or random erasing in ffcv), centre crop for evaluation; images come out uint8
`[B, 3, H, W]` (normalise on the GPU with `transforms.normalize_on_device`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvtkit.models.factory import EvalConfig

from cvtkit.shards import ShardFolderError
from .transforms import AugmentConfig
from .position import EpochLoader


def rank_indices(num_samples: int, rank: int, world_size: int, batch_size: int, seed: int,
                 epoch: int, train: bool, skip_batches: int = 0) -> np.ndarray:
    """This rank's sample indices for the epoch, in delivery order."""
    if not train:
        return np.arange(rank, num_samples, world_size, dtype=np.uint64)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    usable = num_samples // (world_size * batch_size) * world_size * batch_size
    mine = order[:usable][rank::world_size]
    return mine[skip_batches * batch_size:].astype(np.uint64)


@dataclass
class FfcvLoader(EpochLoader):
    """Batches `(uint8 images [B, 3, S, S], labels [B])` of one rank from a `.beton` file."""
    path: str
    batch_size: int
    size: int
    rank: int = 0
    world_size: int = 1
    workers: int = 2
    seed: int = 0
    train: bool = True
    augment: AugmentConfig | None = None
    eval_cfg: EvalConfig | None = None

    def __post_init__(self):
        from ffcv.reader import Reader
        self.num_samples = Reader(self.path).num_samples
        if self.train and self.num_samples < self.world_size * self.batch_size:
            raise ShardFolderError(f"{self.path}: {self.num_samples} samples cannot give one batch of "
                             f"{self.batch_size} to each of {self.world_size} ranks")
        self._start_position()
        self._loader = self._order = None

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        return -(-len(range(self.rank, self.num_samples, self.world_size)) // self.batch_size)

    def _pipelines(self) -> dict:
        from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder,
                                          RandomResizedCropRGBImageDecoder)
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        if self.train:
            aug = self.augment or AugmentConfig()
            image = [RandomResizedCropRGBImageDecoder((self.size, self.size), scale=aug.scale,
                                                      ratio=aug.ratio),
                     RandomHorizontalFlip(aug.hflip)]
        else:
            cfg = self.eval_cfg or EvalConfig(self.size, 0.875, "center")
            if cfg.crop_mode != "center":
                raise ValueError(f"ffcv has no square-warp decoder for crop_mode={cfg.crop_mode!r}; "
                                 f"evaluate from webdataset shards instead")
            image = [CenterCropRGBImageDecoder((cfg.input_size, cfg.input_size), ratio=cfg.crop_pct)]
        return {"image": image + [ToTensor(), ToTorchImage()], "label": [IntDecoder(), ToTensor()]}

    def _ffcv_loader(self):
        """ffcv's Loader, built (and its pipeline compiled) once per run: each epoch only hands
        its order the rank's indices for that epoch."""
        if self._loader is None:
            from ffcv.loader import Loader
            self._order = _epoch_order()
            # The Loader cuts every epoch's order to its first one's length: give it a full epoch.
            full = rank_indices(self.num_samples, self.rank, self.world_size, self.batch_size, self.seed,
                                0, self.train)
            self._loader = Loader(self.path, batch_size=self.batch_size, num_workers=max(1, self.workers),
                                  order=self._order, indices=full, drop_last=False, seed=self.seed,
                                  pipelines=self._pipelines())
        return self._loader

    def _epoch_batches(self, epoch: int, skip: int):
        indices = rank_indices(self.num_samples, self.rank, self.world_size, self.batch_size,
                               self.seed, epoch, self.train, skip)
        if len(indices) == 0:
            return
        # ffcv sets PyTorch's thread count to its own workers' when its Loader is built and as an
        # epoch starts; the trainer's setting is put back before the trainer runs, or its CPU ops
        # would contend with ffcv's threads (measured: twice the CPU time per op).
        threads = torch.get_num_threads()
        loader = self._ffcv_loader()
        self._order.current = indices
        batches = iter(loader)
        torch.set_num_threads(threads)
        try:
            for images, labels in batches:
                yield images, labels.flatten().to(torch.int64)
        finally:
            torch.set_num_threads(threads)


def _epoch_order():
    """A TraversalOrder whose `sample_order` is whatever the FfcvLoader set for this epoch."""
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        current: np.ndarray | None = None

        def __init__(self):  # ffcv calls an order instance with its Loader (`order(loader)`)
            pass

        def __call__(self, loader):
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.current if self.current is not None else self.indices

    return EpochOrder()

