"""ImageNet (22k or 1k) into webdataset shards: planned deterministically, written in parallel,
restartable, with `_info.json` (timm's format plus classes, sha256 and a report) written last.

The plan (which image goes to which shard, in which order) is a pure function of the source
listing and the options, so a restarted run recomputes it, keeps the shards already finished
(each has a manifest entry written after its atomic rename) and writes the rest: the result is
byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .images import BadImage, Resize, prepare_image
from .shardfile import write_json_atomic, write_shard
from .shard_info import INFO_FILE, class_list_sha256
from .sources import Item, Source, SourceError, iter_stream_tar_of_tars, scan

MANIFEST_DIR = "_manifest"
OPTIONS_FILE = "_options.json"
SPOOL_DIR = "_spool"


@dataclass(frozen=True)
class PrepOptions:
    source: str
    out: str
    prefix: str = "imagenet"
    shard_samples: int = 1000
    shard_bytes: int = 0  # > 0: cut shards by source bytes instead of sample count
    workers: int = 4
    resize: str | None = None  # "shorter:256" / "longer:512"; None copies JPEGs untouched
    quality: int = 90
    decode_check: bool = False  # also decode copied JPEGs (at 1/8 scale) to find corrupt data
    seed: int = 0
    holdout: int = 50  # per class (at most half of it), for sources without a validation split (22k)
    classes: tuple[str, ...] = ()  # a subset of synsets; empty: all
    val_labels: str | None = None

    def __post_init__(self):
        if self.shard_samples <= 0:
            raise ValueError(f"shard size: expected a positive number of samples, got {self.shard_samples}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality: expected 1..100, got {self.quality}")
        if self.holdout < 0:
            raise ValueError(f"holdout: expected >= 0, got {self.holdout}")
        if self.resize:
            Resize.parse(self.resize)

    def fingerprint(self) -> dict:
        """What determines the bytes of the output (workers do not)."""
        d = asdict(self)
        d.pop("workers")
        d.pop("out")
        d["classes"] = list(self.classes)
        return d


@dataclass
class ShardTask:
    split: str
    index: int
    path: Path
    items: list[Item]
    labels: list[int]
    resize: Resize | None
    quality: int
    decode_check: bool


@dataclass
class ShardResult:
    split: str
    index: int
    name: str
    num_samples: int
    sha256: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)


def _ordered_hash(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def plan_splits(source: Source, opts: PrepOptions) -> tuple[list[str], dict[str, list[Item]]]:
    """Classes (sorted synsets) and the shuffled items of each split."""
    wanted = set(opts.classes)
    if wanted:
        present = {i.synset for i in source.splits["train"]}
        missing = sorted(wanted - present)
        if missing:
            raise SourceError(f"{source.root}: classes not in the source: {', '.join(missing[:5])}")
    splits = {name: [i for i in items if not wanted or i.synset in wanted]
              for name, items in source.splits.items()}
    classes = sorted({i.synset for i in splits["train"]})
    if "validation" not in splits and opts.holdout > 0:
        # A fixed number per class, chosen by a seeded hash of the key: stable whatever the
        # listing order, and the same images whatever the other options.
        by_class: dict[str, list[Item]] = {}
        for item in splits["train"]:
            by_class.setdefault(item.synset, []).append(item)
        held = set()
        for items in by_class.values():
            ranked = sorted(items, key=lambda i: _ordered_hash(opts.seed, i.key))
            # At most half of a small class, so that every class keeps training images.
            held.update(i.key for i in ranked[:min(opts.holdout, len(items) // 2)])
        splits["validation"] = [i for i in splits["train"] if i.key in held]
        splits["train"] = [i for i in splits["train"] if i.key not in held]
    known = set(classes)
    for name, items in splits.items():
        stray = sorted({i.synset for i in items} - known)
        if stray:
            raise SourceError(f"{source.root}: {name} images of classes with no training images: {stray[:5]}")
        items.sort(key=lambda i: i.key)
        random.Random(f"{opts.seed}:{name}").shuffle(items)
    return classes, splits


def cut_shards(items: list[Item], opts: PrepOptions) -> list[list[Item]]:
    shards, current, size = [], [], 0
    for item in items:
        full = (len(current) >= opts.shard_samples if opts.shard_bytes <= 0
                else current and size + item.size > opts.shard_bytes)
        if full:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        shards.append(current)
    return shards


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}-{split}-{index:06d}.tar"


def process_shard(task: ShardTask) -> ShardResult:
    """Read, check and convert every image of one shard and write it; runs in a worker."""
    samples, skipped, converted = [], [], []
    for item, label in zip(task.items, task.labels):
        try:
            img = prepare_image(item.read(), task.resize, task.quality, task.decode_check)
        except BadImage as e:
            skipped.append((item.filename, str(e)))
            continue
        except OSError as e:
            skipped.append((item.filename, f"unreadable ({e.strerror or e})"))
            continue
        if img.note and not img.note.startswith("resized"):
            converted.append((item.filename, img.note))
        record = dict(label=label, synset=item.synset, filename=item.filename,
                      width=img.width, height=img.height)
        if (img.width, img.height) != (img.orig_width, img.orig_height):
            record.update(orig_width=img.orig_width, orig_height=img.orig_height)
        samples.append((item.key, img.jpeg, label, record))
    digest = write_shard(task.path, samples)
    return ShardResult(task.split, task.index, task.path.name, len(samples), digest, skipped, converted)


def class_names(synsets: list[str]) -> list[str]:
    from timm.data import ImageNetInfo  # timm imports torch: kept out of the worker processes

    info = ImageNetInfo("imagenet-22k")
    names = []
    for s in synsets:
        try:
            names.append(info.label_name_to_description(s))
        except Exception:  # noqa: BLE001 - a synset outside timm's lists keeps its id as name
            names.append(s)
    return names


def synset_map_1k(classes: list[str]) -> dict[str, int | None]:
    """For each ImageNet-1k synset, its index among `classes`, or None (e.g. n04399382)."""
    from timm.data import ImageNetInfo

    index = {s: i for i, s in enumerate(classes)}
    return {s: index.get(s) for s in ImageNetInfo("imagenet-1k").label_names()}


def _check_options(out: Path, opts: PrepOptions) -> None:
    """Refuse to mix the shards of two different jobs in one folder."""
    path = out / OPTIONS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != opts.fingerprint():
            diff = sorted(k for k in set(before) | set(opts.fingerprint())
                          if before.get(k) != opts.fingerprint().get(k))
            raise SourceError(f"{out}: holds shards made with other options ({', '.join(diff)}); "
                              f"use another --out or empty it")
    else:
        write_json_atomic(path, opts.fingerprint())


def run(opts: PrepOptions, progress: bool = True, task_index: int = 0, num_tasks: int = 1) -> dict | None:
    """Do the whole job (or what is left of it); returns the `_info.json` content.

    With `num_tasks > 1` (a Slurm array), this task writes only every `num_tasks`-th shard from
    `task_index` on; `_info.json` is written by whichever task finds every shard finished (the
    last one), and None is returned by the others."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index: expected 0..{num_tasks - 1}, got {task_index}")
    source = scan(opts.source, opts.val_labels)
    classes, splits = plan_splits(source, opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_options(out, opts)
    (out / MANIFEST_DIR).mkdir(exist_ok=True)
    label_of = {s: i for i, s in enumerate(classes)}
    resize = Resize.parse(opts.resize) if opts.resize else None

    planned = [(split, index, shard) for split, items in splits.items()
               for index, shard in enumerate(cut_shards(items, opts))]
    names = [shard_name(opts.prefix, split, index) for split, index, _ in planned]
    tasks, skipped_done = [], 0
    for k, (split, index, shard) in enumerate(planned):
        if k % num_tasks != task_index:
            continue
        path = out / names[k]
        for leftover in [*out.glob(f".{path.name}.tmp*"), *(out / MANIFEST_DIR).glob(f".{path.name}.json.tmp*")]:
            leftover.unlink()  # a write cut short by a kill; the shard is redone below
        if (out / MANIFEST_DIR / (path.name + ".json")).is_file() and path.is_file():
            skipped_done += 1
            continue
        tasks.append(ShardTask(split, index, path, shard, [label_of[i.synset] for i in shard],
                               resize, opts.quality, opts.decode_check))
    if tasks and source.layout == "targz22k":
        tasks = spool(source, tasks, out / SPOOL_DIR, progress)
    start = time.time()
    bar = tqdm(total=sum(len(t.items) for t in tasks), unit="img", desc=f"shards -> {out}",
               disable=not progress, smoothing=0.1, dynamic_ncols=True)
    if progress:
        part = f" (task {task_index} of {num_tasks})" if num_tasks > 1 else ""
        bar.write(f"{source.layout} source {source.root}: {len(classes)} classes, "
                  + ", ".join(f"{len(v)} {k}" for k, v in splits.items())
                  + f"; {skipped_done} shards already done, {len(tasks)} to write{part}")

    def finished(result: ShardResult):
        # The manifest entry is the commit record: written only after the shard's rename.
        write_json_atomic(out / MANIFEST_DIR / (result.name + ".json"), asdict(result))
        bar.update(result.num_samples + len(result.skipped))

    if opts.workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(opts.workers) as pool:
            for result in pool.imap_unordered(process_shard, tasks):
                finished(result)
    else:
        for task in tasks:
            finished(process_shard(task))
    bar.close()
    for task in tasks:
        for item_file in {i.path for i in task.items if Path(i.path).parent == out / SPOOL_DIR}:
            os.remove(item_file)

    entries = [out / MANIFEST_DIR / (n + ".json") for n in names]
    remaining = sum(not e.is_file() or not (out / n).is_file() for e, n in zip(entries, names))
    if remaining:
        if progress:
            print(f"task {task_index} of {num_tasks} done in {time.time() - start:.1f}s; "
                  f"{remaining} shards of other tasks remain, _info.json comes with the last")
        return None
    if (out / SPOOL_DIR).is_dir() and not any((out / SPOOL_DIR).iterdir()):
        (out / SPOOL_DIR).rmdir()
    done = [ShardResult(**json.loads(e.read_text())) for e in entries]
    info = build_info(opts, source, classes, splits.keys(), done)
    write_json_atomic(out / INFO_FILE, info)
    if progress:
        rep = info["report"]
        print(f"done in {time.time() - start:.1f}s: "
              + ", ".join(f"{s['num_samples']} {k} in {len(s['filenames'])} shards"
                          for k, s in info["splits"].items())
              + f"; skipped {rep['num_skipped']}, converted {rep['num_converted']}, "
              + f"rejected {rep['num_rejected']} (details in {out / INFO_FILE})")
    return info


def spool(source: Source, tasks: list[ShardTask], spool_dir: Path, progress: bool) -> list[ShardTask]:
    """A compressed source cannot be read at random: stream it once more and append each image
    of a shard still to write to `spool_dir/<shard>.bin`, then point the items there.

    The spool holds the remaining shards' source bytes (deleted at the end). A kill during this
    pass redoes it; finished shards are never spooled again."""
    spool_dir.mkdir(exist_ok=True)
    target = {item.filename: n for n, t in enumerate(tasks) for item in t.items}
    files = [spool_dir / (t.path.name + ".bin") for t in tasks]
    sizes = [0] * len(tasks)
    for f in files:
        f.write_bytes(b"")
    offsets: dict[str, int] = {}
    handles: dict[int, object] = {}
    bar = tqdm(total=sum(i.size for t in tasks for i in t.items), unit="B", unit_scale=True,
               desc=f"spooling {source.root.name}", disable=not progress, dynamic_ncols=True)
    try:
        for outer_name, inner_name, data in iter_stream_tar_of_tars(source.root):
            n = target.get(f"{outer_name}:{inner_name}") if data is not None else None
            if n is None:
                continue
            if n not in handles:
                if len(handles) >= 256:  # stay far below the open-file limit
                    for h in handles.values():
                        h.close()
                    handles.clear()
                handles[n] = open(files[n], "ab")
            handles[n].write(data)
            offsets[f"{outer_name}:{inner_name}"] = sizes[n]
            sizes[n] += len(data)
            bar.update(len(data))
    finally:
        for h in handles.values():
            h.close()
        bar.close()
    missing = [f for f in target if f not in offsets]
    if missing:
        raise SourceError(f"{source.root}: changed since it was listed ({missing[0]} not found again)")
    return [dataclasses.replace(t, items=[dataclasses.replace(i, path=str(files[n]), offset=offsets[i.filename])
                                          for i in t.items])
            for n, t in enumerate(tasks)]


def build_info(opts: PrepOptions, source: Source, classes: list[str], split_names, results) -> dict:
    by_split: dict[str, list[ShardResult]] = {}
    for r in sorted(results, key=lambda r: (r.split, r.index)):
        by_split.setdefault(r.split, []).append(r)
    names = class_names(classes)
    skipped = sorted({tuple(s) for r in results for s in r.skipped})
    converted = sorted({tuple(c) for r in results for c in r.converted})
    info = {
        "name": opts.prefix,
        "source": {"path": str(source.root), "layout": source.layout},
        "options": opts.fingerprint(),
        "num_classes": len(classes),
        "classes": [{"index": i, "synset": s, "name": n} for i, (s, n) in enumerate(zip(classes, names))],
        "classes_sha256": class_list_sha256(classes),
        "splits": {
            split: {
                "name": split,
                "num_samples": sum(r.num_samples for r in shards),
                "filenames": [r.name for r in shards],
                "shard_lengths": [r.num_samples for r in shards],
                "shard_sha256": [r.sha256 for r in shards],
            } for split in split_names if (shards := by_split.get(split))
        },
        "report": {
            "num_skipped": len(skipped), "num_converted": len(converted),
            "num_rejected": len(source.rejected),
            "skipped": [{"file": f, "reason": why} for f, why in skipped],
            "converted": [{"file": f, "reason": why} for f, why in converted],
            "rejected": [{"file": f, "reason": why} for f, why in sorted(source.rejected)],
        },
    }
    if source.layout != "imagenet1k":
        info["synset_map_1k"] = synset_map_1k(classes)
    return info
