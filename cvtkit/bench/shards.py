"""Shard-writing speed: copy mode and resize mode beside a plain `tar` of the same files; and, with
`--scale`, data preparation at ImageNet-22k's shape, projected to fall11's 14,197,122 images.

    python -m cvtkit.bench.shards                       # synthetic 500x375 JPEGs
    python -m cvtkit.bench.shards --source /data/imagenet/train --workers 8 --repeats 3
    python -m cvtkit.bench.shards --scale --per-class 1,3,10 --workers 2

All modes run in one process on the same (page-cached) files; the table gives medians over
`--repeats` and each mode's time as a ratio of tar's.

The scale mode builds 22k-shaped sources (a tar of per-synset tars, timm's 21,841 synsets, tiny
~300-byte JPEGs: the listing and the plan cost per image, not per byte) with 1, 3 and 10 images
per class by default. For each it runs make_shards once, then again after dropping the last two
shards (a restart after a kill), each run in its own process, and prints the listing times, the
plan time, when the restart starts writing, the write rate, and the peak memory of the main
process (before `_info.json`, whose class names import timm and torch: a fixed cost) and of the
largest worker; then a linear fit projected to fall11's 14,197,122 images, and the listing rate
of `tarfile` (the listing before the index) and of the index at 1 and `--workers` workers.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cvtkit.prep.pipeline import PrepOptions, run
from cvtkit.shards import INFO_FILE

FALL11_IMAGES = 14_197_122


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


def make_tar22k(path: Path, synsets: list[str], per_class: int) -> int:
    """A tar of per-synset tars of tiny JPEGs (fall11_whole.tar's shape); returns the images."""
    tiny = []
    for i in range(64):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 4, 255 - i * 4, i * 2)).save(buf, "JPEG", quality=90)
        tiny.append(buf.getvalue())
    with tarfile.open(path, "w") as outer:
        for c, synset in enumerate(synsets):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for i in range(per_class):
                    data = tiny[(c + i) % len(tiny)]
                    info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{synset}.tar")
            info.size = inner_buf.tell()
            outer.addfile(info, io.BytesIO(inner_buf.getvalue()))
    return len(synsets) * per_class


def _vm_hwm_mib() -> float:
    """This process's peak resident memory so far (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _list_before(source: str) -> int:
    """The listing before the index: tarfile for every header, one Item object per image."""
    from pathlib import PurePosixPath

    from cvtkit.prep.sources import Item, TarWindow, sample_key
    items = []
    with tarfile.open(source, "r:") as outer:
        for member in outer:
            base = member.offset_data
            with tarfile.open(fileobj=TarWindow(outer.fileobj, base, member.size), mode="r:") as inner:
                for m in inner:
                    items.append(Item(member.name[:-4], sample_key(PurePosixPath(m.name).stem),
                                      f"{member.name}:{m.name}", source, m.size, base + m.offset_data))
    return len(items)


def _measure(spec: dict) -> dict:
    """One measurement, in a process of its own: a make_shards run, or a listing alone."""
    from cvtkit.prep import pipeline as prep
    from cvtkit.prep.listing import Workers
    from cvtkit.prep.source_index import open_index, survey

    start = time.perf_counter()
    if spec["mode"] == "before":
        return {"images": _list_before(spec["source"]), "seconds": time.perf_counter() - start}
    if spec["mode"] == "list":
        out = Path(spec["out"])
        out.mkdir(parents=True)
        with Workers(spec["workers"]) as workers:
            index = open_index(survey(Path(spec["source"])), Path(spec["source"]), out, workers,
                               shards_written=False, progress=False)
        return {"images": len(index.tables["train"]), "seconds": time.perf_counter() - start}
    work_peak = {}
    build_info = prep.build_info

    def measured_build_info(*args, **kwargs):
        # The shards are written and the workers gone: the work's peaks are known. (Importing
        # torch for the class names next also forks a helper, which would count as a child.)
        work_peak["main"] = _vm_hwm_mib()
        work_peak["worker"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return build_info(*args, **kwargs)
    prep.build_info = measured_build_info
    stats: dict = {}
    try:
        prep.run(PrepOptions(**spec["options"]), progress=False, stats=stats)
    finally:
        prep.build_info = build_info
    return {**stats, "main_mib": work_peak["main"], "worker_mib": work_peak["worker"],
            "main_with_info_mib": _vm_hwm_mib(), "total_s": time.perf_counter() - start}


def _measured(spec: dict, isolate: bool) -> dict:
    if not isolate:  # tests: in this process (memory figures are then this process's)
        return _measure(spec)
    proc = subprocess.run([sys.executable, "-m", "cvtkit.bench.shards", "--measure", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec['mode']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _drop_last_shards(out: Path, count: int) -> None:
    """What a kill leaves: the last shards not written (nor recorded)."""
    for shard in sorted(out.glob("*-train-*.tar"))[-count:]:
        shard.unlink()
        (out / "_manifest" / f"{shard.name}.json").unlink()
    (out / INFO_FILE).unlink()


def scale_table(num_synsets: int, per_class: list[int], workers: int, isolate: bool = True) -> list[dict]:
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo("imagenet-22k").label_names()[:num_synsets]
    synsets += [f"n{90000000 + i:08d}" for i in range(num_synsets - len(synsets))]
    work = Path(tempfile.mkdtemp(prefix="cvtkit-bench-scale-"))
    rows, listing = [], []
    try:
        for k in per_class:
            source, out = work / f"fall11-{k}.tar", work / f"out-{k}"
            images = make_tar22k(source, synsets, k)
            opts = dict(source=str(source), out=str(out), workers=workers, holdout=50, shard_samples=1000)
            first = _measured({"mode": "run", "options": opts}, isolate)
            _drop_last_shards(out, 2)
            restart = _measured({"mode": "run", "options": opts}, isolate)
            rows.append({"images": images, "first": first, "restart": restart})
            shutil.rmtree(out)
            if k == max(per_class):
                modes = [("tarfile, one Item per image (before)", {"mode": "before"}),
                         ("index, 1 worker", {"mode": "list", "workers": 1})]
                modes += [(f"index, {workers} workers", {"mode": "list", "workers": workers})] if workers > 1 else []
                for name, spec in modes:
                    got = _measured({**spec, "source": str(source), "out": str(work / "list")}, isolate)
                    shutil.rmtree(work / "list", ignore_errors=True)
                    listing.append((name, got["images"], got["seconds"]))
            source.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_scale(rows, listing, num_synsets, workers)
    return rows


def _print_scale(rows: list[dict], listing: list[tuple], num_synsets: int, workers: int) -> None:
    columns = [  # (heading, value of a row)
        ("images", lambda r: r["images"]),
        ("list first s", lambda r: r["first"]["index_s"]),
        ("list restart s", lambda r: r["restart"]["index_s"]),
        ("plan first s", lambda r: r["first"]["plan_s"]),
        ("restart writes after s", lambda r: r["restart"]["start_writing_s"]),
        ("write img/s", lambda r: r["first"]["written_images"] / r["first"]["write_s"]),
        ("main peak MiB", lambda r: max(r["first"]["main_mib"], r["restart"]["main_mib"])),
        ("worker peak MiB", lambda r: max(r["first"]["worker_mib"], r["restart"]["worker_mib"])),
    ]
    print(f"22k-shaped tar of tars, {num_synsets} synsets, {workers} workers, holdout 50, 1000 per shard")
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    table = np.array([[f(r) for _, f in columns] for r in rows], float)
    for values in table:
        print("| " + " | ".join(f"{v:,.0f}" if i in (0, 5) else f"{v:,.2f}" if i < 5 else f"{v:,.0f}"
                                for i, v in enumerate(values)) + " |")
    if len(rows) >= 2:
        _print_projection(table)
    info = max(max(r["first"]["main_with_info_mib"], r["restart"]["main_with_info_mib"]) for r in rows)
    print(f"main peak including _info.json (timm's class names import torch): {info:,.0f} MiB at the largest size")
    print("\n| listing the largest source | images | seconds | images/s |\n|---|---|---|---|")
    for name, images, seconds in listing:
        print(f"| {name} | {images:,} | {seconds:.2f} | {images / seconds:,.0f} |")


def _print_projection(table: np.ndarray) -> None:
    """Two rows at fall11's size: a linear fit (the memory figures: their slope is clear), and for
    the times, which are too small here for a steady slope, the largest size scaled in proportion
    (an upper bound: it counts every fixed cost 650 times). The write rate is not projected."""
    scale = FALL11_IMAGES / table[-1, 0]
    fit = [np.polyval(np.polyfit(table[:, 0], table[:, i], 1), FALL11_IMAGES) for i in range(1, table.shape[1])]
    bound = [table[-1, i] * scale for i in range(1, 5)]
    fmt = lambda values: " | ".join(f"{v:,.1f}" if isinstance(v, float) else v for v in values)  # noqa: E731
    print(f"| {FALL11_IMAGES:,} (linear fit) | " + fmt([*fit[:4], "-", *fit[5:]]) + " |")
    print(f"| {FALL11_IMAGES:,} (largest x {scale:,.0f}) | " + fmt([*bound, "-", "-", "-"]) + " |")
    restart = max(fit[3], bound[3])
    print(f"\nat {FALL11_IMAGES:,} images, projected: a restart starts writing after at most {restart:.0f} s "
          f"(target 60 s: {'met' if restart <= 60 else 'NOT met'}); the first listing takes "
          f"{max(fit[0], bound[0]):.0f} s at most and the first plan {max(fit[2], bound[2]):.0f} s; "
          f"main process peak {fit[5]:.0f} MiB, worker peak {fit[6]:.0f} MiB (linear fit; target "
          f"1024 MiB per task: {'met' if max(fit[5], fit[6]) <= 1024 else 'NOT met'})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="a folder of synset folders (default: synthetic images)")
    p.add_argument("--images", type=int, default=400, help="synthetic images to make")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resize", default="shorter:256")
    p.add_argument("--scale", action="store_true",
                   help="22k-shaped tar of tars at three sizes: listing, restart, memory, projection")
    p.add_argument("--synsets", type=int, default=21841, help="--scale: classes of the sources")
    p.add_argument("--per-class", default="1,3,10", help="--scale: images per class of each source")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # --scale runs each measurement so, alone
    args = p.parse_args(argv)
    if args.scale:
        return scale_table(args.synsets, [int(k) for k in args.per_class.split(",")], args.workers)
    if args.measure:
        print(json.dumps(_measure(json.loads(args.measure))))
        return None

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
