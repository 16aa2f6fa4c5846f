"""Loader speed on the same photo-like images, side by side in one run, against ImageFolder.

    python -m cvtkit.bench.loaders --images 1500 --workers 2 --size 224 --repeats 3 [--profile]
    python -m cvtkit.bench.loaders ... [--device-batch 256 --device-size 224] [--device-only]
    python -m cvtkit.bench.loaders --shards /data/in22k-hub --split train_12k --batches 50

With `--shards`, the shard loaders read that folder (cvtkit's or the hub's layout) for `--batches`
batches per repeat instead, with no ImageFolder baseline (DALI's row is left out for a split
labelled from each sample's json, which DALI cannot read).

Rows (uint8 out everywhere: random erasing and normalisation run on the device, as in timm's
prefetcher and in cvtkit's trainer):
- ImageFolder + timm's DeiT transform (RRC, flip, RandAugment), and + RRC + flip only;
- WdsLoader with the DeiT recipe from JPEG bytes (`transforms.train_decoder`), and with the
  PIL transform (the path before it);
- WdsLoader with `randaugment_on: device`: the CPU side only (decode, crop, flip, RandAugment's
  draws); the device side is measured apart, in milliseconds per batch (`--device-batch`,
  `--device-size`), on the GPU where there is one, else on the CPU;
- FfcvLoader (RRC + flip: all ffcv offers of the recipe);
- DaliLoader on DALI's CPU operators (crop-decode, resize, flip, DALI's RandAugment), and with
  "mixed" decoding on a GPU.
A loader whose package is not installed (DALI and ffcv do not travel to a bare GPU machine) is a
row that says so, never a measurement.
Each repeat runs one epoch of every loader in turn (the first, a warm-up for the page cache and
ffcv's compilation, is not counted); the table has medians. "per core" is images per CPU second
of the loader's processes (the trainer's process, its threads, and the workers, from
getrusage), which another job on a shared machine disturbs far less than wall time; "x
ImageFolder" compares per-core rates with the ImageFolder row of the same recipe. `--profile`
adds where one process spends its time per image, stage by stage.

The images are synthetic but look like photos to a JPEG codec: 500x375, smooth shapes and
gradients under luminance texture, about 100 KiB each at quality 90 (not flat colours, which
decode several times faster than photos).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from cvtkit.prep.pipeline import PrepOptions, run
from cvtkit.data.randaugment_device import DeviceRandAugment, RandAugmentDraws
from cvtkit.data.transforms import AugmentConfig, min_decode_side, timm_randaugment, train_decoder, train_transform
from cvtkit.data.wds_loader import WdsLoader
from cvtkit.shards import ShardFolderError, ShardSet

DEIT, RRC_FLIP = "DeiT", "RRC + flip"


def _field(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    """Smooth noise: a `cells`-wide grid of normal values, bicubic-upsampled to w x h x 3."""
    small = rng.normal(0, amp, (max(2, cells * h // w), cells, 3)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC))
                     for c in range(3)], -1)


def photo(rng: np.random.Generator, size=(500, 375)) -> Image.Image:
    w, h = size
    img = Image.fromarray((128 + _field(rng, w, h, 4, 70)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(15):
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(8, 100)
        draw.ellipse([x - r, y - r * rng.uniform(0.3, 1.5), x + r, y + r],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    texture = (_field(rng, w, h, 40, 20) + _field(rng, w, h, 125, 40)[..., :1]
               + _field(rng, w, h, 250, 40)[..., :1] + rng.normal(0, 4, (h, w, 1)))
    return Image.fromarray((np.asarray(img) + texture).clip(0, 255).astype(np.uint8))


def make_photos(root: Path, images: int, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder tree (`root/<synset>/<synset>_<i>.JPEG`) of photo-like JPEGs."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        synset = f"n{1000000 + i % classes:08d}"
        (root / synset).mkdir(parents=True, exist_ok=True)
        photo(rng).save(root / synset / f"{synset}_{i}.JPEG", quality=90)
    return root


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _epoch(make_loader, batches: int | None = None) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch, or of its first `batches`; the loader's
    workers end with it."""
    loader = make_loader()
    torch.set_num_threads(1)  # the trainer's process does no pixel work here
    cpu, start = _cpu_seconds(), time.perf_counter()
    count = sum(len(batch[1]) for batch in itertools.islice(loader, batches))
    wall = time.perf_counter() - start
    del loader
    return count, wall, _cpu_seconds() - cpu


def _timm(size: int, auto_augment: str | None):
    from timm.data import create_transform
    return create_transform(input_size=size, is_training=True, auto_augment=auto_augment, color_jitter=None,
                            interpolation="bicubic", use_prefetcher=True)


def loaders(work: Path, src: Path, size: int, batch: int, workers: int) -> dict:
    """name -> (recipe, a function that builds the loader for one epoch)."""
    aug = AugmentConfig()
    shards = ShardSet.from_info(str(work / "wds"), "train")
    rows = {
        "ImageFolder + timm DeiT": (DEIT, lambda: DataLoader(
            ImageFolder(str(src), transform=_timm(size, aug.auto_augment)), batch_size=batch,
            num_workers=workers, shuffle=True, drop_last=True)),
        "ImageFolder + timm RRC + flip": (RRC_FLIP, lambda: DataLoader(
            ImageFolder(str(src), transform=_timm(size, None)), batch_size=batch, num_workers=workers,
            shuffle=True, drop_last=True)),
        **wds_rows(shards, size, batch, workers),
    }
    if (work / "train.beton").is_file():
        from cvtkit.data.ffcv_loader import FfcvLoader
        ffcv = FfcvLoader(str(work / "train.beton"), batch, size, workers=workers)  # one Loader per run
        rows["FfcvLoader RRC + flip"] = (RRC_FLIP, lambda: ffcv)
    elif not installed("ffcv"):
        rows["FfcvLoader RRC + flip"] = (RRC_FLIP, None)
    return {**rows, **dali_rows(shards, size, batch, workers)}


def wds_rows(shards: ShardSet, size: int, batch: int, workers: int) -> dict:
    aug, on_device = AugmentConfig(), AugmentConfig(randaugment_on="device")
    return {
        "WdsLoader DeiT (from JPEG bytes)": (DEIT, lambda: WdsLoader(
            shards, batch, workers=workers, transform=train_decoder(aug, size), shuffle_buffer=500)),
        "WdsLoader DeiT, RandAugment on device": (DEIT, lambda: WdsLoader(
            shards, batch, workers=workers, transform=train_decoder(on_device, size), shuffle_buffer=500)),
        "WdsLoader DeiT (PIL transform)": (DEIT, lambda: WdsLoader(
            shards, batch, workers=workers, transform=train_transform(aug, size, normalize=False),
            shuffle_buffer=500, decode_min_side=min_decode_side(size, aug))),
    }


def dali_rows(shards: ShardSet, size: int, batch: int, workers: int) -> dict:
    """DALI's rows; none for a split DALI cannot label (`dali_loader.check_labels`)."""
    if not installed("nvidia.dali"):  # a bare GPU machine: DALI (~870 MB) does not travel
        return {"DaliLoader DeiT (CPU operators)": (DEIT, None), "DaliLoader DeiT (mixed, GPU)": (DEIT, None)}
    from cvtkit.data.dali_loader import DaliLoader, check_labels
    try:
        check_labels(shards)
    except ShardFolderError as e:
        print(f"DaliLoader left out: {e.one_line()}")
        return {}
    rows = {}
    rows["DaliLoader DeiT (CPU operators)"] = (DEIT, lambda: DaliLoader(
        shards, batch, size, workers=max(1, workers), device="cpu", shuffle_buffer=500))
    if torch.cuda.is_available():  # nvJPEG and the GPU's JPEG decoders: a GPU machine's row
        rows["DaliLoader DeiT (mixed, GPU)"] = (DEIT, lambda: DaliLoader(
            shards, batch, size, workers=max(1, workers), device="gpu", shuffle_buffer=500))
    return rows


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def measure(rows: dict, repeats: int, batches: int | None = None) -> list[tuple[str, str, float | None, float | None]]:
    """(name, recipe, median images/s, median images per CPU second), repeats interleaved; None
    for a loader whose package is not installed here."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for rep in range(repeats + 1):
        for name, (_, make) in rows.items():
            if make is None:
                continue
            count, wall, cpu = _epoch(make, batches)
            if rep:  # the first pass warms up
                samples[name].append((count / wall, count / max(cpu, 1e-9)))
    return [(name, rows[name][0], *((statistics.median(s[0] for s in got), statistics.median(s[1] for s in got))
                                    if got else (None, None))) for name, got in samples.items()]


def print_table(results, title: str, size: int, batch: int, workers: int, repeats: int, unit: str = "epochs") -> None:
    base = {recipe: core for name, recipe, _, core in results if name.startswith("ImageFolder")}
    print(f"{title} -> {size}px uint8, batch {batch}, {workers} workers, medians of {repeats} {unit}")
    print(f"| {'loader':<37} | {'recipe':<10} | {'images/s':>8} | {'per core':>8} | {'x ImageFolder':>13} |")
    print(f"|{'-' * 39}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 15}|")
    for name, recipe, rate, core in results:
        if rate is None:  # never a measurement
            print(f"| {name:<37} | {recipe:<10} | not installed here (not measured) | | |")
            continue
        ratio = f"{core / base[recipe]:.2f}" if recipe in base else "-"
        print(f"| {name:<37} | {recipe:<10} | {rate:>8.0f} | {core:>8.0f} | {ratio:>13} |")


def device_randaugment(batch: int, size: int, repeats: int, device: torch.device) -> list[float]:
    """Milliseconds per batch of the device half of `randaugment_on: device` (`DeviceRandAugment`:
    timm's RandAugment from the workers' draws) on `batch` photo-like crops at `size`, each with
    its own draws; the first call warms up and is not counted."""
    ra = timm_randaugment(AugmentConfig(randaugment_on="device"), size)
    rng = np.random.default_rng(0)
    distinct = [torch.from_numpy(np.array(photo(rng, (size, size)))).permute(2, 0, 1) for _ in range(16)]
    images = torch.stack([distinct[i % len(distinct)] for i in range(batch)]).to(device)
    draw, draws = RandAugmentDraws(ra), []
    for i in range(batch):
        random.seed(i)
        np.random.seed(i)
        draws.append(draw())
    apply, draws = DeviceRandAugment(ra), torch.stack(draws)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        apply(images, draws)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return times[1:]


def print_device_row(batch: int, size: int, repeats: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ms = statistics.median(device_randaugment(batch, size, repeats, device))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print("\n| device half of `randaugment_on: device` | batch | size | device | ms per batch | ms per image |")
    print("|---|---|---|---|---|---|")
    print(f"| WdsLoader DeiT, RandAugment on device | {batch} | {size} | {where} | {ms:.1f} | {ms / batch:.3f} |")


def _samples(shards: ShardSet, limit: int) -> list[bytes]:
    import webdataset as wds
    out = []
    for sample in wds.tarfile_to_samples()([{"url": u} for u in shards.urls]):
        out.append(sample["jpg"])
        if len(out) == limit:
            break
    return out


def _stages(steps, images: list, repeats: int = 2) -> dict[str, float]:
    """Median ms per image of each named step; each step takes the previous one's output."""
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(repeats):
        random.seed(0)
        np.random.seed(0)
        for data in images:
            value = data
            for name, step in steps:
                start = time.perf_counter()
                value = step(value)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) if name == "read" else 1000 * sum(t) / len(t)
            for name, t in times.items()}


def print_profile(shards: ShardSet, size: int, rows: dict, workers: int, limit: int = 200) -> None:
    """Where one process spends its time per image: the timm PIL path and the bytes path, stage
    by stage, then the loaders' trainer-process share (IPC, collation in the trainer)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from cvtkit.data import jpeg_crop as jpeg
    aug = AugmentConfig()
    images = _samples(shards, limit)
    timm = _timm(size, aug.auto_augment).transforms
    rrc, flip, rand_aug, to_tensor = timm[0], timm[1], timm[2], timm[-1]
    decoder = train_decoder(aug, size)
    pil_path = [("decode (PIL, full size)", lambda b: Image.open(io.BytesIO(b)).convert("RGB")),
                ("random resized crop (PIL bicubic)", rrc), ("flip", flip), ("RandAugment (timm)", rand_aug),
                ("to uint8 tensor", to_tensor)]
    assert isinstance(rrc, RandomResizedCropAndInterpolation)
    crop = {}

    def draw(data):
        crop["box"] = decoder.crop.sample(*jpeg.jpeg_size(data))
        return data

    def decode(data):
        box = crop["box"]
        return jpeg.decode_rgb(data, jpeg.dct_reduction(box[3], box[2], size))

    bytes_path = [("header + crop drawn", draw), ("decode (libjpeg-turbo, 1/k)", decode),
                  ("crop + resize (torch bicubic AA)", lambda d: jpeg.resized_crop(d[0], crop["box"], d[1], size)),
                  ("flip + RandAugment (timm)", lambda a: rand_aug(flip(Image.fromarray(a)))),
                  ("to uint8 tensor", lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1))]
    draws = RandAugmentDraws(timm_randaugment(AugmentConfig(randaugment_on="device"), size))
    device_path = bytes_path[:3] + [
        ("flip + RandAugment's draws (timm's, recorded)", lambda a: (np.ascontiguousarray(a[:, ::-1]), draws())),
        ("to uint8 tensor", lambda d: torch.from_numpy(d[0]).permute(2, 0, 1))]
    print(f"\nper-image profile, one process, {len(images)} images (ms per image, mean)")
    for title, steps in (("ImageFolder/timm path", pil_path), ("WdsLoader bytes path", bytes_path),
                         ("WdsLoader bytes path, RandAugment on device (CPU side)", device_path)):
        got = _stages(steps, images)
        print(f"  {title}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()) + f"; total {sum(got.values()):.2f}")
    for name in ("ImageFolder + timm DeiT", "WdsLoader DeiT (from JPEG bytes)",
                 "WdsLoader DeiT, RandAugment on device"):
        loader = rows[name][1]()
        own = resource.getrusage(resource.RUSAGE_SELF)
        count, wall, cpu = _epoch(lambda: loader)
        after = resource.getrusage(resource.RUSAGE_SELF)
        main_ms = 1000 * (after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime) / count
        print(f"  {name}: {1000 * cpu / count:.2f} ms CPU per image in all, of which the trainer's "
              f"process {main_ms:.2f} ({workers} workers)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device-batch", type=int, default=256, help="batch of the device-half row")
    p.add_argument("--device-size", type=int, default=224, help="image size of the device-half row")
    p.add_argument("--device-only", action="store_true", help="only the device-half row (quick, on a GPU)")
    p.add_argument("--no-ffcv", action="store_true", help="leave the ffcv row out")
    p.add_argument("--profile", action="store_true", help="also print the per-stage breakdown")
    p.add_argument("--shards", help="measure the shard loaders on this folder (cvtkit's or the hub's layout)")
    p.add_argument("--split", default="train", help="with --shards: the split (default: train)")
    p.add_argument("--batches", type=int, default=20, help="with --shards: batches per repeat")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.device_only:
        print_device_row(args.device_batch, args.device_size, args.repeats)
        return
    if args.shards:
        shards = ShardSet.from_info(args.shards, args.split)
        rows = {**wds_rows(shards, args.size, args.batch_size, args.workers),
                **dali_rows(shards, args.size, args.batch_size, args.workers)}
        title = f"{args.shards} split {args.split!r}"
        print_table(measure(rows, args.repeats, args.batches), title, args.size, args.batch_size, args.workers,
                    args.repeats, f"runs of {args.batches} batches")
        return
    work = Path(tempfile.mkdtemp(prefix="cvtkit-bench-loaders-"))
    try:
        src = make_photos(work / "src", args.images)
        run(PrepOptions(source=str(src), out=str(work / "wds"), holdout=0, shard_samples=100,
                        workers=args.workers), progress=False)
        if not args.no_ffcv and installed("ffcv"):
            from cvtkit.prep.beton import write_beton
            write_beton(work / "wds", "train", work / "train.beton", max_resolution=512, workers=args.workers)
        rows = loaders(work, src, args.size, args.batch_size, args.workers)
        title = f"{args.images} photo-like 500x375 JPEGs (~100 KiB, q90)"
        print_table(measure(rows, args.repeats), title, args.size, args.batch_size, args.workers, args.repeats)
        print_device_row(args.device_batch, args.device_size, args.repeats)
        if args.profile:
            print_profile(ShardSet.from_info(str(work / "wds"), "train"), args.size, rows, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
