"""ImageNet (22k or 1k) into webdataset shards: planned deterministically, written in parallel,
restartable, with `_info.json` (timm's format plus classes, sha256 and a report) written last.

The source is listed once per output folder (`source_index`: `_index/`, shared by restarts and
array tasks); the plan (which image goes to which shard, in which order) is a pure function of
that listing and the options (`plan`, stored beside it). A restarted run reads both, keeps the
shards already finished (each has a manifest entry written after its atomic rename) and writes
the rest: the result is byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from cvtkit.errors import CvtkitError

from .convert_image import BadImage, Resize, prepare_image
from .listing import Workers
from .plan import Plan, PlannedShard, load_or_compute_plan
from cvtkit.shards import INFO_FILE, class_list_sha256, class_records
from .tar_writer import write_json_atomic, write_shard
from .source_index import SourceIndex, open_index, survey
from .sources import Item, Source, SourceError
from .spool import spool

MANIFEST_DIR = "_manifest"
OPTIONS_FILE = "_options.json"
SPOOL_DIR = "_spool"


class OptionError(CvtkitError, ValueError):
    """An option out of range; the message names it and what was expected."""


class OutputError(CvtkitError):
    """The output folder cannot be created or written."""


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
            raise OptionError(f"shard size: expected a positive number of samples, got {self.shard_samples}")
        if not 1 <= self.quality <= 100:
            raise OptionError(f"quality: expected 1..100, got {self.quality}")
        if self.holdout < 0:
            raise OptionError(f"holdout: expected >= 0, got {self.holdout}")
        if self.workers < 1:
            raise OptionError(f"workers: expected >= 1, got {self.workers}")
        if self.resize:
            try:
                Resize.parse(self.resize)
            except ValueError as e:  # Resize.parse's own message: "resize 'x': expected ..."
                raise OptionError(str(e)) from None

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


def synset_map_1k(classes: list[str]) -> dict[str, int | None]:
    """For each ImageNet-1k synset, its index among `classes`, or None (e.g. n04399382)."""
    from timm.data import ImageNetInfo

    index = {s: i for i, s in enumerate(classes)}
    return {s: index.get(s) for s in ImageNetInfo("imagenet-1k").label_names()}




def _prepare_output(out: Path, opts: PrepOptions) -> None:
    """Create the folder; refuse to mix the shards of two different jobs in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_DIR).mkdir(exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only file system
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror})") from None
    path = out / OPTIONS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != opts.fingerprint():
            diff = sorted(k for k in set(before) | set(opts.fingerprint())
                          if before.get(k) != opts.fingerprint().get(k))
            raise SourceError(f"{out}: holds shards made with other options ({', '.join(diff)}); "
                              f"use another --out or empty it")
        return
    try:
        write_json_atomic(path, opts.fingerprint())
    except PermissionError as e:
        raise OutputError(f"{out}: cannot write in the output folder ({e.strerror})") from None


def _finished(out: Path, names: list[str]) -> list[bool]:
    """Which shards are done: renamed into place and recorded (one listing of each folder)."""
    files, entries = set(os.listdir(out)), set(os.listdir(out / MANIFEST_DIR))
    return [n in files and f"{n}.json" in entries for n in names]


def _remove_leftovers(out: Path, mine: set[str]) -> None:
    """Temporary files of this task's shards: a write cut short by a kill (the shard is redone)."""
    for folder, suffix in ((out, ""), (out / MANIFEST_DIR, ".json")):
        for entry in os.listdir(folder):
            if entry.startswith(".") and ".tmp" in entry:
                name = entry[1:].rsplit(".tmp", 1)[0].removesuffix(suffix)
                if name in mine:
                    os.remove(folder / entry)


def run(opts: PrepOptions, progress: bool = True, task_index: int = 0, num_tasks: int = 1,
        stats: dict | None = None) -> dict | None:
    """Do the whole job (or what is left of it); returns the `_info.json` content.

    With `num_tasks > 1` (a Slurm array), this task writes only every `num_tasks`-th shard from
    `task_index` on; `_info.json` is written by whichever task finds every shard finished (the
    last one), and None is returned by the others. `stats`, if given, receives timings and counts
    (index_s, plan_s, start_writing_s, write_s, written_images, listed_units, listed_images)."""
    if not 0 <= task_index < num_tasks:
        raise OptionError(f"task index: expected 0..{num_tasks - 1}, got {task_index}")
    stats = {} if stats is None else stats
    start = time.perf_counter()
    root, out = Path(opts.source), Path(opts.out)
    found = survey(root, opts.val_labels)  # a missing or unknown source fails before `out` exists
    _prepare_output(out, opts)
    with Workers(opts.workers) as workers:
        index = open_index(found, root, out, workers, shards_written=any(os.scandir(out / MANIFEST_DIR)),
                           task_index=task_index, num_tasks=num_tasks, progress=progress, stats=stats)
        stats["index_s"] = time.perf_counter() - start
        plan = load_or_compute_plan(index, opts, progress)
        stats["plan_s"] = time.perf_counter() - start - stats["index_s"]
        shards = plan.shards()
        names = [shard_name(opts.prefix, s.split, s.index) for s in shards]
        mine = [k for k in range(len(shards)) if k % num_tasks == task_index]
        _remove_leftovers(out, {names[k] for k in mine})
        done = _finished(out, [names[k] for k in mine])
        todo = [k for k, finished in zip(mine, done) if not finished]
        if progress:
            part = f" (task {task_index} of {num_tasks})" if num_tasks > 1 else ""
            tqdm.write(f"{index.layout} source {root}: {len(plan.classes)} classes, "
                       + ", ".join(f"{len(v)} {k}" for k, v in plan.rows.items())
                       + f"; {sum(done)} shards already done, {len(todo)} to write{part}")
        _write_shards(index, plan, [(shards[k], names[k]) for k in todo], opts, out, workers,
                      progress, stats, start)
        rejected, layout, split_names, classes = index.rejected, index.layout, list(plan.rows), plan.classes
        del index, plan, shards  # the listing of 14M images is not needed any more
    remaining = len(names) - sum(_finished(out, names))
    if remaining:
        if progress:
            print(f"task {task_index} of {num_tasks} done in {time.perf_counter() - start:.1f}s; "
                  f"{remaining} shards of other tasks remain, _info.json comes with the last")
        return None
    if (out / SPOOL_DIR).is_dir() and not any((out / SPOOL_DIR).iterdir()):
        (out / SPOOL_DIR).rmdir()
    results = [ShardResult(**json.loads((out / MANIFEST_DIR / f"{n}.json").read_text())) for n in names]
    info = build_info(opts, Source(layout, root, {}, rejected), classes, split_names, results)
    write_json_atomic(out / INFO_FILE, info)
    if progress:
        rep = info["report"]
        print(f"done in {time.perf_counter() - start:.1f}s: "
              + ", ".join(f"{s['num_samples']} {k} in {len(s['filenames'])} shards"
                          for k, s in info["splits"].items())
              + f"; skipped {rep['num_skipped']}, converted {rep['num_converted']}, "
              + f"rejected {rep['num_rejected']} (details in {out / INFO_FILE})")
    return info


def _write_shards(index: SourceIndex, plan: Plan, todo: list[tuple[PlannedShard, str]], opts: PrepOptions,
                  out: Path, workers: Workers, progress: bool, stats: dict, start: float) -> None:
    """Write the shards of `todo`; workers get one shard's items each, made as they are sent."""
    labels = {split: plan.labels(t.synsets) for split, t in index.tables.items()}
    resize = Resize.parse(opts.resize) if opts.resize else None
    spooled = {}
    if todo and index.layout == "targz22k":
        spooled = spool(index, {name: plan.rows[s.split][s.start:s.end] for s, name in todo},
                        out / SPOOL_DIR, progress)

    def tasks():
        for shard, name in todo:
            stats.setdefault("start_writing_s", time.perf_counter() - start)
            rows = plan.rows[shard.split][shard.start:shard.end]
            items = index.items(shard.source_split, rows)
            if name in spooled:
                path, offsets = spooled[name]
                items = [dataclasses.replace(i, path=path, offset=int(o)) for i, o in zip(items, offsets)]
            synsets = index.tables[shard.source_split].items.synset[rows]
            yield ShardTask(shard.split, shard.index, out / name, items,
                            labels[shard.source_split][synsets].tolist(), resize, opts.quality,
                            opts.decode_check)

    begin = time.perf_counter()
    bar = tqdm(total=sum(s.end - s.start for s, _ in todo), unit="img", desc=f"shards -> {out}",
               disable=not progress, smoothing=0.1, dynamic_ncols=True)
    written = 0
    for result in workers.imap(process_shard, tasks(), parallel=len(todo) > 1, ordered=False):
        # The manifest entry is the commit record: written only after the shard's rename.
        write_json_atomic(out / MANIFEST_DIR / (result.name + ".json"), asdict(result))
        bar.update(result.num_samples + len(result.skipped))
        written += result.num_samples + len(result.skipped)
        if result.name in spooled:
            os.remove(spooled[result.name][0])
    bar.close()
    stats.update(write_s=time.perf_counter() - begin, written_images=written)


def build_info(opts: PrepOptions, source: Source, classes: list[str], split_names, results) -> dict:
    by_split: dict[str, list[ShardResult]] = {}
    for r in sorted(results, key=lambda r: (r.split, r.index)):
        by_split.setdefault(r.split, []).append(r)
    skipped = sorted({tuple(s) for r in results for s in r.skipped})
    converted = sorted({tuple(c) for r in results for c in r.converted})
    info = {
        "name": opts.prefix,
        "source": {"path": str(source.root), "layout": source.layout},
        "options": opts.fingerprint(),
        "num_classes": len(classes),
        "classes": class_records(classes),
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
