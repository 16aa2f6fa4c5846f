"""The listing of a source, made once per output folder and shared by every restart and every
Slurm array task: `OUT/_index/<identity>/`.

- `units.json`: the source's identity (path, size and mtime; for folders, every synset folder's
  mtime), its units (per-synset tars or folders) and how they are grouped into parts;
- `part-00000.npz`, ...: the images of each part as columns (`columns.ItemTable`), each written
  under a temporary name, fsynced and renamed: a file with the final name is always complete;
- `plan-*.npz`: the plan made from it (`plan.py`).

The index is used only once units.json and every part are there. Array tasks build disjoint
parts (part p by task p mod N first, then any part that nobody is building: `claims.py`), so the
job reads the source's headers once, and a restart lists only the parts still missing. A source
whose identity changed is listed again when no shard was written yet, and refused otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cvtkit.atomic import atomic_open

from .claims import Claims, is_dead, owner
from .columns import ItemTable, Table, concat_tables
from .listing import Unit, Workers, folder_units, list_stream, list_units, outer_units
from .sources import (STREAMED, Item, SourceError, detect_layout, has_flat_val, val_labels_file)

INDEX_DIR = "_index"
FORMAT = 1
POLL_S = 2.0


class SourceChanged(SourceError):
    """The source is not the one the shards already written were listed from."""


@dataclass
class SourceIndex:
    """Every image of a source, as one `Table` per split ("train", maybe "validation")."""
    layout: str
    root: Path
    tables: dict[str, Table]
    rejected: list[tuple[str, str]]  # (name, reason): members refused before reading
    folder: Path | None = None  # where it is stored; None: listed in memory only

    def filename(self, split: str, row: int) -> str:
        table = self.tables[split]
        return table.groups[int(table.items.group[row])] + table.items.name(row, table.tails)

    def items(self, split: str, rows) -> list[Item]:
        """The rows as `Item`s (a shard's worth at a time, not millions)."""
        table, root = self.tables[split], str(self.root)
        cols, out = table.items, []
        for row in map(int, rows):
            filename = self.filename(split, row)
            if self.layout == "tar22k":
                path, offset = root, int(cols.offset[row])
            elif self.layout == "targz22k":
                path, offset = root, STREAMED
            else:
                path, offset = os.path.join(root, filename), -1
            out.append(Item(table.synsets[int(cols.synset[row])], cols.keys[row], filename, path,
                            int(cols.size[row]), offset))
        return out


@dataclass
class Survey:
    """What a stat or a directory listing tells about a source, before reading any header."""
    layout: str
    identity: dict
    units: list[Unit] | None  # known already for folders; tars need their headers read
    labels_file: str | None = None


def survey(root: Path, val_labels: str | Path | None = None) -> Survey:
    layout = detect_layout(root)
    base = {"format": FORMAT, "layout": layout, "path": os.path.abspath(root)}
    if layout in ("tar22k", "targz22k"):
        st = os.stat(root)
        return Survey(layout, {**base, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, None)
    flat = layout == "imagenet1k" and has_flat_val(root)
    labels = val_labels_file(root, Path(val_labels) if val_labels else None) if flat else None
    pairs = folder_units(root, layout, flat)
    h = hashlib.sha256()
    for unit, path in pairs:  # adding, removing or renaming a file changes its folder's mtime
        h.update(f"{unit.group}\t{os.stat(path).st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    identity = {**base, "folders": len(pairs), "folders_sha256": h.hexdigest()}
    if labels:
        st = os.stat(labels)
        identity["labels"] = [str(labels), st.st_size, st.st_mtime_ns]
    return Survey(layout, identity, [u for u, _ in pairs], str(labels) if labels else None)


def part_units(num_units: int) -> int:
    """Units per part: about 64 parts (so up to 64 array tasks share the listing), at most 256
    units each (a restart after a kill relists at most that much)."""
    return max(1, min(256, -(-num_units // 64)))


def _tables_by_split(results: list[tuple[dict[str, Table], list]]) -> tuple[dict[str, Table], list]:
    """Merge listing results (a table per split, and refused members) in order."""
    by_split: dict[str, list[Table]] = {}
    rejected = []
    for tables, refused in results:
        for split, table in tables.items():
            by_split.setdefault(split, []).append(table)
        rejected += refused
    return {split: concat_tables([lambda t=t: t for t in tables], [t.counts() for t in tables])
            for split, tables in by_split.items()}, rejected


def _check_train(root: Path, layout: str, tables: dict[str, Table]) -> None:
    if "train" not in tables or not len(tables["train"].items):
        raise SourceError(f"{root}: no images found ({layout} layout)")


def list_source(root: Path, val_labels: str | Path | None = None) -> SourceIndex:
    """List a source in this process, storing nothing (tests)."""
    found = survey(root, val_labels)
    if found.layout == "targz22k":
        tables, rejected = _tables_by_split([({"train": t}, r) for t, r in list_stream(root)])
    else:
        units, rejected = (found.units, []) if found.units is not None else outer_units(root)
        job = (str(root), found.layout, [tuple(u) for u in units], found.labels_file)
        tables, refused = _tables_by_split([list_units(job)])
        rejected += refused
    _check_train(root, found.layout, tables)
    return SourceIndex(found.layout, root, tables, rejected)


def save_npz(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    with atomic_open(path, "wb", owner=_tmp_owner()) as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _write_json(path: Path, obj) -> None:
    with atomic_open(path, "w", owner=_tmp_owner()) as f:
        json.dump(obj, f)


def _tmp_owner() -> str:
    """Temporaries named `-host-pid`: a later task can tell a dead local writer's leftovers."""
    me = owner()
    return f"-{me['host']}-{me['pid']}"


def _log_built(folder: Path, name: str, images: int) -> None:
    """One line per stored part (and units.json) in `listed.log`: which task listed what. A part
    listed twice (a claim taken over from a task that was not dead after all) shows twice."""
    me = owner()
    with open(folder / "listed.log", "a") as f:
        f.write(f"{name} {images} {me['host']} {me['pid']} {me['job'] or '-'}\n")


def _read_meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return json.loads(f["meta"].tobytes())


@dataclass
class _Job:
    """One task's work on the index of one output folder."""
    root: Path
    found: Survey
    folder: Path
    digest: str
    workers: Workers
    task_index: int
    num_tasks: int
    progress: bool
    claims: Claims
    stats: dict = field(default_factory=dict)


def open_index(found: Survey, root: Path, out: Path, workers: Workers, *, shards_written: bool,
               task_index: int = 0, num_tasks: int = 1, progress: bool = True,
               stats: dict | None = None) -> SourceIndex:
    """The stored index of `root` in `out`, built (or completed) first where needed."""
    digest = hashlib.sha256(json.dumps(found.identity, sort_keys=True).encode()).hexdigest()
    folder = out / INDEX_DIR / digest[:16]
    _forget_other_listings(out, folder, found.identity, root, shards_written)
    folder.mkdir(parents=True, exist_ok=True)
    job = _Job(root, found, folder, digest, workers, task_index, num_tasks, progress, Claims(folder),
               stats if stats is not None else {})
    job.stats.update(listed_units=0, listed_images=0)
    meta = _units(job)
    names = [f"part-{p:05d}" for p in range(meta["parts"])]
    own = {n for p, n in enumerate(names) if p % num_tasks == task_index}
    _await(job, names, own, lambda todo: _build_parts(job, meta, todo), "index parts")
    job.claims.clear()
    _remove_dead_leftovers(folder)
    return _load(job, meta, names)


def _describe(old: dict, new: dict) -> str:
    def show(key, value):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value / 1e9)) if key == "mtime_ns" else value
    return ", ".join(f"{k.removesuffix('_ns')} {show(k, old.get(k))} -> {show(k, new.get(k))}"
                     if k in ("size", "mtime_ns", "folders", "layout", "path") else f"{k} differs"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def _forget_other_listings(out: Path, folder: Path, identity: dict, root: Path, shards_written: bool) -> None:
    base = out / INDEX_DIR
    others = [d for d in base.iterdir() if d.is_dir() and d != folder] if base.is_dir() else []
    listed = [d for d in others if (d / "units.json").is_file()]
    if listed:
        old = json.loads((listed[0] / "units.json").read_text())["identity"]
        change = _describe(old, identity)
        if shards_written:
            raise SourceChanged(f"{root}: changed since it was listed ({change}); the shards in {out} "
                                f"come from the old listing: use another --out or empty it")
        print(f"note: {root}: changed since it was listed ({change}); no shard was written yet: "
              f"listing it again", file=sys.stderr)
    for d in others:  # the listing of another identity, or a partial one
        shutil.rmtree(d, onerror=_ignore_missing)


def _ignore_missing(func, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):  # another task removed it first
        raise exc_info[1]


def _remove_dead_leftovers(folder: Path) -> None:
    """Temporary files of processes of this host that died (killed mid-write)."""
    me = owner()
    for tmp in folder.glob(".*.tmp-*"):
        host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        if pid.isdigit() and is_dead({"host": host, "boot": me["boot"], "pid": int(pid)}, me):
            tmp.unlink(missing_ok=True)


def _await(job: _Job, names: list[str], own: set[str], build, what: str) -> None:
    """Until every `names[i].npz` (or .json) exists: build this task's own share and whatever no
    live task is building (one at a time, so that a late task still finds its share), else wait."""
    def present(name):
        return (job.folder / f"{name}.npz").is_file() or (job.folder / f"{name}.json").is_file()

    bar = None
    while missing := [n for n in names if not present(n)]:
        todo = [n for n in missing if n in own and job.claims.take(n)]
        if not todo:
            todo = next(([n] for n in missing if job.claims.take(n)), [])
        for name in [n for n in todo if present(n)]:  # finished by another task meanwhile
            job.claims.release(name)
            todo.remove(name)
        if todo:
            build(todo)
            continue
        if bar is None:
            bar = tqdm(total=len(names), desc=f"waiting for {what} from other tasks", unit="part",
                       disable=not job.progress, dynamic_ncols=True)
        bar.update(len(names) - len(missing) - bar.n)
        time.sleep(POLL_S)
    if bar is not None:
        bar.update(len(names) - bar.n)
        bar.close()


def _units(job: _Job) -> dict:
    """units.json: made from the survey (folders), by reading the outer headers (a tar) or by
    listing the whole stream (a compressed tar), by one task while the others wait."""
    path = job.folder / "units.json"
    if not path.is_file() and job.found.units is not None:
        units = job.found.units
        _write_json(path, _units_meta(job, units, []))
    elif not path.is_file():
        build = _list_whole_stream if job.found.layout == "targz22k" else _list_outer
        _await(job, ["units"], {"units"}, lambda todo: build(job), "the list of per-synset tars")
    return json.loads(path.read_text())


def _units_meta(job: _Job, units: list[Unit], rejected: list, parts: int | None = None) -> dict:
    group = part_units(len(units))
    return {"format": FORMAT, "identity": job.found.identity, "digest": job.digest,
            "units": [list(u) for u in units], "part_units": group,
            "parts": parts if parts is not None else -(-len(units) // group), "rejected": rejected}


def _bar(job: _Job, total: int, desc: str, unit: str = "B") -> tqdm:
    return tqdm(total=total, unit=unit, unit_scale=True, desc=f"listing {job.root.name}: {desc}",
                disable=not job.progress, smoothing=0.1, dynamic_ncols=True)


def _list_outer(job: _Job) -> None:
    size = os.stat(job.root).st_size
    with _bar(job, size, "per-synset tars") as bar:
        def tick(pos):
            bar.update(pos - bar.n)
            job.claims.beat()
        units, rejected = outer_units(job.root, tick)
        bar.update(size - bar.n)
    _write_json(job.folder / "units.json", _units_meta(job, units, rejected))
    _log_built(job.folder, "units", len(units))
    job.claims.release("units")


def _list_whole_stream(job: _Job) -> None:
    """A compressed stream has one reader: parts are written as it goes, units.json last."""
    size, parts = os.stat(job.root).st_size, 0
    with _bar(job, size, "streaming") as bar:
        def progress(pos):
            bar.update(pos - bar.n)
            job.claims.beat()
        for table, rejected in list_stream(job.root, progress):
            _save_part(job.folder, job.digest, f"part-{parts:05d}", {"train": table}, rejected)
            job.stats["listed_images"] += len(table.items)
            bar.set_postfix(images=job.stats["listed_images"], refresh=False)
            parts += 1
        bar.update(size - bar.n)
    _write_json(job.folder / "units.json", _units_meta(job, [], [], parts))
    _log_built(job.folder, "units", job.stats["listed_images"])
    job.claims.release("units")


def _save_part(folder: Path, digest: str, name: str, tables: dict[str, Table], rejected: list) -> None:
    splits = {split: {"groups": t.groups, "synsets": t.synsets, "tails": t.tails, "counts": t.counts()}
              for split, t in tables.items()}
    arrays = {k: v for split, t in tables.items() for k, v in t.items.arrays(split).items()}
    meta = {"format": FORMAT, "digest": digest, "name": name, "splits": splits, "rejected": rejected}
    save_npz(folder / f"{name}.npz", meta, arrays)


def list_part(work: tuple) -> tuple[str, int]:
    """A worker's job: list the units of one part and store it; returns (name, images)."""
    root, layout, labels_file, folder, digest, name, units = work
    tables, rejected = _tables_by_split([list_units((root, layout, units, labels_file))])
    images = sum(len(t) for t in tables.values())
    _save_part(Path(folder), digest, name, tables, rejected)
    _log_built(Path(folder), name, images)
    return name, images


def _build_parts(job: _Job, meta: dict, names: list[str]) -> None:
    """List these parts, one worker job each, each part stored by the worker that listed it."""
    units = [Unit._make(u) for u in meta["units"]]
    group = meta["part_units"]
    per_part = {n: units[int(n[5:]) * group:(int(n[5:]) + 1) * group] for n in names}
    work = [(str(job.root), job.found.layout, job.found.labels_file, str(job.folder), job.digest, name,
             [tuple(u) for u in part]) for name, part in per_part.items()]
    by_tar = job.found.layout == "tar22k"
    weight = {n: sum(u.size for u in p) if by_tar else len(p) for n, p in per_part.items()}
    with _bar(job, sum(weight.values()), "images", "B" if by_tar else "folder") as bar:
        for name, images in job.workers.imap(list_part, work, parallel=len(work) > 1, ordered=False):
            job.claims.release(name)
            job.claims.beat()
            job.stats["listed_units"] += len(per_part[name])
            job.stats["listed_images"] += images
            bar.set_postfix(images=job.stats["listed_images"], refresh=False)
            bar.update(weight[name])


def _load(job: _Job, meta: dict, names: list[str]) -> SourceIndex:
    """The parts merged, one at a time into preallocated columns."""
    paths = [job.folder / f"{n}.npz" for n in names]
    metas = [_read_meta(p) for p in paths]
    for m, n in zip(metas, names):
        if m.get("format") != FORMAT or m.get("digest") != job.digest or m.get("name") != n:
            raise SourceError(f"{job.folder / n}.npz: not a part of this index (delete {job.folder})")
    splits = list(dict.fromkeys(s for m in metas for s in m["splits"]))
    tables = {}
    for split in splits:
        having = [(p, m["splits"][split]) for p, m in zip(paths, metas) if split in m["splits"]]
        tables[split] = concat_tables([lambda p=p, s=s: _read_table(p, split, s) for p, s in having],
                                      [s["counts"] for _, s in having])
    _check_train(job.root, job.found.layout, tables)
    rejected = [tuple(r) for r in meta["rejected"]] + [tuple(r) for m in metas for r in m["rejected"]]
    return SourceIndex(job.found.layout, job.root, tables, rejected, job.folder)


def _read_table(path: Path, split: str, about: dict) -> Table:
    with np.load(path, allow_pickle=False) as f:
        items = ItemTable.from_arrays(lambda k: f[k], split)
    return Table(items, about["groups"], about["synsets"], about["tails"])
