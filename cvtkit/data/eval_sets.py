"""Evaluation sets decoded with PIL and the official transform (docs/evaluation.md), each sample once across
ranks (rank r takes samples r, r + world, ...), as uint8 batches `[B, 3, S, S]` with labels:

- an image folder in ImageFolder's layout (`root/<synset>/*.JPEG`, e.g. ImageNet's `val/`);
- the images of an ffcv `.beton` file, read from their stored bytes. ffcv's own decoders resize
  with OpenCV's area filter and have no square warp, so they cannot give the official bicubic
  resize + centre crop or CvT's 384 squash; this path does.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cvtkit.errors import CvtkitError
from cvtkit.models.factory import EvalConfig
from cvtkit.shards import IMAGE_SUFFIXES

from .transforms import eval_transform



class EvalDataError(CvtkitError):
    """An image folder or `.beton` file that cannot be evaluated on as it is."""


def folder_classes(root: str | Path) -> list[str]:
    """The class folders of an ImageFolder-style tree, sorted (its label order)."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


class FolderImages(Dataset):
    """`root/<class>/<image>`: label = the class's index in `classes` (default: sorted folders)."""

    def __init__(self, root: str | Path, transform: Callable, rank: int = 0, world_size: int = 1,
                 classes: list[str] | None = None):
        root = Path(root)
        found = folder_classes(root)
        if not found:
            raise EvalDataError(f"{root}: no class folders (expected {root}/<synset>/*.JPEG)")
        self.classes = classes if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise EvalDataError(f"{root}: class folders the model has no class for: {', '.join(unknown[:5])}"
                             + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        items = [(str(f), index[c]) for c in found for f in sorted((root / c).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        self.items = items[rank::world_size]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


class BetonImages(Dataset):
    """The `image` (RGBImageField) and `label` (IntField) of a `.beton`, without ffcv's loader."""

    def __init__(self, path: str | Path, transform: Callable, rank: int = 0, world_size: int = 1):
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader

        self.path = str(path)
        reader = Reader(self.path)
        kinds = {type(h): i for i, h in enumerate(reader.handlers.values())}
        if RGBImageField not in kinds or IntField not in kinds:
            raise EvalDataError(f"{path}: expected an RGBImageField and an IntField "
                             f"(fields: {', '.join(reader.field_names)})")
        self.images = reader.metadata[f"f{kinds[RGBImageField]}"]
        self.labels = reader.metadata[f"f{kinds[IntField]}"]
        table = np.sort(reader.alloc_table, order="ptr")
        self.ptrs, self.sizes = table["ptr"], table["size"]
        self.indices = np.arange(rank, int(reader.num_samples), world_size)
        self.transform = transform
        self._data = None  # memory-mapped on first use, in each worker

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        j = self.indices[i]
        meta = self.images[j]
        ptr = int(meta["data_ptr"])
        size = int(self.sizes[np.searchsorted(self.ptrs, ptr)])
        raw = self._data[ptr:ptr + size]
        if meta["mode"] == 0:  # ffcv's IMAGE_MODES: 0 jpg, 1 raw
            img = Image.open(io.BytesIO(raw.tobytes())).convert("RGB")
        else:
            img = Image.fromarray(np.asarray(raw).reshape(int(meta["height"]), int(meta["width"]), 3))
        return self.transform(img), int(self.labels[j])


def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def pil_eval_loader(dataset: Dataset, batch: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_collate)


def folder_eval_loader(root: str, eval_cfg: EvalConfig, batch: int, rank: int, world_size: int,
                       workers: int, classes: list[str] | None = None) -> DataLoader:
    return pil_eval_loader(FolderImages(root, eval_transform(eval_cfg, normalize=False), rank, world_size,
                                        classes), batch, workers)


def beton_eval_loader(path: str, eval_cfg: EvalConfig, batch: int, rank: int, world_size: int,
                      workers: int) -> DataLoader:
    return pil_eval_loader(BetonImages(path, eval_transform(eval_cfg, normalize=False), rank, world_size),
                           batch, workers)
