"""Shard-writing speed: copy mode and resize mode beside a plain `tar` of the same files.

    python -m cvtkit.bench.shards                       # synthetic 500x375 JPEGs
    python -m cvtkit.bench.shards --source /data/imagenet/train --workers 8 --repeats 3

All modes run in one process on the same (page-cached) files; the table gives medians over
`--repeats` and each mode's time as a ratio of tar's.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image

from cvtkit.data.prep import PrepOptions, run


def make_source(root: Path, images: int, classes: int = 10, size=(500, 375), seed: int = 0) -> Path:
    """A folder-of-synsets source of photo-sized JPEGs (noise over gradients, ~100 KB each)."""
    rng = random.Random(seed)
    noise = Image.effect_noise(size, 40).convert("RGB")
    for i in range(images):
        synset = f"n{1000000 + i % classes:08d}"
        (root / synset).mkdir(parents=True, exist_ok=True)
        base = Image.linear_gradient("L").resize(size).convert("RGB")
        tint = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
        img = Image.blend(Image.blend(base, tint, 0.5), noise, rng.uniform(0.2, 0.5))
        img.save(root / synset / f"{synset}_{i}.JPEG", quality=90)
    return root


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="a folder of synset folders (default: synthetic images)")
    p.add_argument("--images", type=int, default=400, help="synthetic images to make")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resize", default="shorter:256")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cvtkit-bench-"))
    try:
        src = Path(args.source) if args.source else make_source(work / "src", args.images)
        n = sum(1 for f in src.rglob("*") if f.is_file())
        tar = _time(lambda: subprocess.run(f"tar -cf - -C '{src}' . | cat > /dev/null", shell=True,
                                           check=True), args.repeats)

        def shards(mode: str | None):
            def go():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                run(PrepOptions(source=str(src), out=str(out), workers=args.workers, resize=mode,
                                holdout=0, shard_samples=256), progress=False)
            return go

        rows = [("tar | cat (reading only)", 1, tar)]
        rows.append(("make_shards copy", args.workers, _time(shards(None), args.repeats)))
        rows.append((f"make_shards resize {args.resize}", args.workers,
                     _time(shards(args.resize), args.repeats)))
        print(f"{n} images from {src}; medians of {args.repeats} runs")
        print(f"{'mode':<34}{'workers':>8}{'seconds':>10}{'images/s':>11}{'per worker':>12}{'x tar time':>12}")
        for mode, workers, seconds in rows:
            print(f"{mode:<34}{workers:>8}{seconds:>10.2f}{n / seconds:>11.0f}"
                  f"{n / seconds / workers:>12.0f}{seconds / tar:>12.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
