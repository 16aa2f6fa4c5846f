"""Loader speed on the same images: webdataset, ffcv, and ImageFolder with the same timm transform.

    python -m cvtkit.bench.loaders --images 1000 --workers 2 --size 224

One epoch per loader after a warm-up epoch (page cache, numba compilation), medians of
`--repeats`; ratios are against ImageFolder + the same transforms. ffcv does what it offers of
the recipe (random resized crop + flip, uint8 output); the other two run the full DeiT transform.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from cvtkit.bench.shards import make_source
from cvtkit.data.ffcv_files import write_beton
from cvtkit.data.ffcv_loader import FfcvLoader
from cvtkit.data.prep import PrepOptions, run
from cvtkit.data.transforms import AugmentConfig, min_decode_side, train_transform
from cvtkit.data.wds_loader import ShardSet, WdsLoader


def _epoch_seconds(make_loader, repeats: int) -> tuple[float, int]:
    times, count = [], 0
    for rep in range(repeats + 1):  # the first pass warms up and is not counted
        start = time.perf_counter()
        count = sum(len(batch[1]) for batch in make_loader())
        if rep:
            times.append(time.perf_counter() - start)
    return statistics.median(times), count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cvtkit-bench-loaders-"))
    try:
        src = make_source(work / "src", args.images)
        run(PrepOptions(source=str(src), out=str(work / "wds"), holdout=0, shard_samples=100,
                        workers=args.workers), progress=False)
        write_beton(work / "wds", "train", work / "train.beton", max_resolution=512, workers=args.workers)
        aug = AugmentConfig()
        tf = train_transform(aug, args.size)
        shards = ShardSet.from_info(str(work / "wds"), "train")
        bs, w = args.batch_size, args.workers
        loaders = {
            "ImageFolder + timm DeiT transform": lambda: DataLoader(
                ImageFolder(str(src), transform=tf), batch_size=bs, num_workers=w, shuffle=True,
                drop_last=True),
            "webdataset (WdsLoader) + same": lambda: WdsLoader(
                shards, bs, workers=w, transform=tf, shuffle_buffer=500,
                decode_min_side=min_decode_side(args.size, aug)),
            "ffcv (RRC + flip only, uint8)": lambda: FfcvLoader(
                str(work / "train.beton"), bs, args.size, workers=w),
        }
        rows = [(name, *_epoch_seconds(make, args.repeats)) for name, make in loaders.items()]
        base = rows[0][2] / rows[0][1]
        print(f"{args.images} synthetic 500x375 JPEGs -> {args.size}px, batch {bs}, {w} workers, "
              f"median of {args.repeats} epochs")
        print(f"{'loader':<36}{'images/s':>10}{'per worker':>12}{'x ImageFolder':>15}")
        for name, seconds, count in rows:
            rate = count / seconds
            print(f"{name:<36}{rate:>10.0f}{rate / max(w, 1):>12.0f}{rate / base:>15.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
