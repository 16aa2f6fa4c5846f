"""ImageNet-1k shards into ffcv `.beton` files (`RGBImageField` + `IntField`), for fine-tuning.

The shards are the single source of truth: the `.beton` holds exactly their samples, in their
order, with the same labels. ffcv needs random access, so each shard's tar is indexed once
(member offsets) and read in place.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvtkit.shards import ShardFolderError, ShardInfo


@dataclass(frozen=True)
class _Sample:
    shard: str
    jpg_offset: int
    jpg_size: int
    label: int


class ShardIndex:
    """Random access to the samples of one split: `ds[i] -> (RGB uint8 array [H, W, 3], label)`."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        shards = ShardInfo.read(str(folder)).split(split)
        if shards.alt_label is not None:  # labels in each sample's json, some samples left out
            raise ShardFolderError(f"{folder}: split {split!r} is labelled from each sample's json field "
                                   f"{shards.alt_label!r}; make_ffcv writes splits labelled by cls only")
        self.num_classes = shards.num_classes
        self.samples: list[_Sample] = []
        for url in shards.urls:
            name = Path(url).name
            jpgs, labels = {}, {}
            with tarfile.open(self.folder / name) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext == "jpg":
                        jpgs[key] = (m.offset_data, m.size)
                    elif ext == "cls":
                        labels[key] = int(tar.extractfile(m).read())
            self.samples += [_Sample(name, *jpgs[k], labels[k]) for k in jpgs]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        with open(self.folder / s.shard, "rb") as f:
            f.seek(s.jpg_offset)
            data = f.read(s.jpg_size)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), s.label


def write_beton(shards: str | Path, split: str, out: str | Path, max_resolution: int = 512,
                jpeg_quality: int = 90, workers: int = 4) -> int:
    """Write one split to `out` (atomically); returns the number of samples.

    Images are stored as JPEG with the longer side capped at `max_resolution` (512 keeps the
    416 -> 384 fine-tuning crop sharp)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = ShardIndex(shards, split)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = DatasetWriter(str(tmp), {
        "image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
        "label": IntField(),
    }, num_workers=workers)
    writer.from_indexed_dataset(dataset)
    tmp.replace(out)
    return len(dataset)
