"""Which image goes to which shard, in which order: a pure function of the index and the options,
computed on arrays and stored beside the index (`plan-<options>.npz`), so that a restart reads it.

It is exactly what the per-image planner before it computed (the shards stay byte-identical):
- classes: the sorted synsets of the training images (of `--classes`, if given);
- a source without a validation split holds out, per class, the `--holdout` images (at most half
  of the class) with the smallest sha256(f"{seed}:{key}");
- each split is sorted by key, then shuffled by `random.Random(f"{seed}:{split}").shuffle`;
- shards are cut by `--shard-samples`, or greedily by `--shard-bytes` of source bytes.
"""
from __future__ import annotations

import array
import hashlib
import json
import random
from dataclasses import dataclass

import numpy as np

from .columns import Strings
from .source_index import save_npz
from .sources import SourceError

FORMAT = 1
PREFIX = 24  # key bytes sorted by numpy; longer keys sharing them are ordered in Python
CHUNK = 1 << 14  # rows per step of the key sort: its temporaries stay a few MiB


@dataclass(frozen=True)
class PlannedShard:
    split: str
    index: int
    source_split: str  # the index table its rows come from
    start: int  # its rows are plan.rows[split][start:end]
    end: int


@dataclass
class Plan:
    classes: list[str]
    source_split: dict[str, str]  # output split -> index table ("validation" held out of "train")
    rows: dict[str, np.ndarray]  # output split -> index rows in shard order
    bounds: dict[str, np.ndarray]  # output split -> shard starts, then the end

    def shards(self) -> list[PlannedShard]:
        return [PlannedShard(split, i, self.source_split[split], int(b[i]), int(b[i + 1]))
                for split, b in self.bounds.items() for i in range(len(b) - 1)]

    def labels(self, synsets: list[str]) -> np.ndarray:
        """Label of each synset id of a table (-1: not a class)."""
        index = {s: i for i, s in enumerate(self.classes)}
        return np.array([index.get(s, -1) for s in synsets] or [-1], np.int64)


def _lengths(keys: Strings, lo: int, hi: int) -> np.ndarray:
    ends = keys.ends[max(lo - 1, 0):hi].astype(np.int64)
    return np.diff(ends, prepend=0) if lo == 0 else np.diff(ends)


def _prefixes(keys: Strings, width: int) -> np.ndarray:
    """The first `width` bytes of every key, NUL-padded, as one S{width} string each."""
    n = len(keys)
    prefix = np.zeros((n, width), np.uint8)
    cols = np.arange(width)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        lengths = _lengths(keys, lo, hi)
        idx = (keys.ends[lo:hi].astype(np.int64) - lengths)[:, None] + cols
        inside = cols < lengths[:, None]
        prefix[lo:hi] = np.where(inside, keys.blob[np.minimum(idx, len(keys.blob) - 1)], 0)
    return prefix.view(f"S{width}").ravel()


def key_order(keys: Strings) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rows sorted by key (byte order of UTF-8 is str order), and the runs [a, b) of that order
    whose keys share their first PREFIX bytes: only there can two keys be equal. The
    temporaries are the prefixes (PREFIX bytes at most) and numpy's 8-byte order, per image."""
    n = len(keys)
    longest = max((int(_lengths(keys, lo, min(n, lo + CHUNK)).max()) for lo in range(0, n, CHUNK)), default=1)
    width = min(max(longest, 1), PREFIX)
    if not len(keys.blob):
        return np.arange(n, dtype=np.int32), ([(0, n)] if n > 1 else [])
    flat = _prefixes(keys, width)
    order = np.argsort(flat, kind="stable")
    same = np.zeros(max(n - 1, 0), bool)
    for lo in range(0, n - 1, CHUNK):
        hi = min(n - 1, lo + CHUNK)
        sp = flat[order[lo:hi + 1]]
        same[lo:hi] = sp[1:] == sp[:-1]
    del flat
    order = order.astype(np.int32 if n < 2 ** 31 else np.int64)
    runs = []
    at = np.flatnonzero(same)
    if len(at):
        breaks = np.flatnonzero(np.diff(at) != 1)
        runs = list(zip(at[np.r_[0, breaks + 1]].tolist(), (at[np.r_[breaks, len(at) - 1]] + 2).tolist()))
    if longest > width:  # keys longer than the prefix: order the runs of equal prefixes fully
        for a, b in runs:
            order[a:b] = sorted(order[a:b].tolist(), key=keys.raw)
    return order, runs


def _duplicate(keys: Strings, order: np.ndarray, runs) -> tuple[int, int] | None:
    """The first image (in listing order) whose key an earlier one has, with that earlier one."""
    found = None
    for a, b in runs:
        rows = order[a:b].tolist()
        for first, second in zip(rows, rows[1:]):
            if keys.raw(first) == keys.raw(second):
                pair = (min(first, second), max(first, second))
                if found is None or pair[1] < found[1]:
                    found = pair
    return found


def check_unique_keys(index, split: str, ordered=None) -> np.ndarray:
    """The key order of a table; SourceError if two of its images share a key."""
    table = index.tables[split]
    order, runs = ordered or key_order(table.items.keys)
    pair = _duplicate(table.items.keys, order, runs)
    if pair:
        key = table.items.keys[pair[0]]
        raise SourceError(f"{index.root}: two {split} images share the key {key!r}: "
                          f"{index.filename(split, pair[0])} and {index.filename(split, pair[1])}")
    return order


def _holdout(table, mask: np.ndarray, seed: int, holdout: int) -> np.ndarray:
    """Rows held out: per class, the `holdout` smallest sha256(f"{seed}:{key}") (at most half)."""
    by_class = np.argsort(table.items.synset, kind="stable")
    by_class = by_class[mask[by_class]].astype(np.int32 if len(mask) < 2 ** 31 else np.int64)
    cuts = np.flatnonzero(np.diff(table.items.synset[by_class])) + 1
    keys = table.items.keys
    blob, base = memoryview(keys.blob), hashlib.sha256(f"{seed}:".encode())
    held = np.zeros(len(table.items), bool)
    for members in np.split(by_class, cuts):
        take = min(holdout, len(members) // 2)
        if not take:
            continue
        ends = keys.ends[members].tolist()
        starts = np.where(members > 0, keys.ends[np.maximum(members, 1) - 1], 0).tolist()
        digests = []
        for s, e in zip(starts, ends):
            h = base.copy()
            h.update(blob[s:e])
            digests.append(h.digest())  # same order as the hex digests
        ranked = sorted(range(len(members)), key=digests.__getitem__)[:take]
        held[members[ranked]] = True
    return held


def _shuffled(rows: np.ndarray, seed: str) -> np.ndarray:
    """`random.Random(seed).shuffle` of the rows, run on a compact array of positions."""
    perm = array.array("i" if len(rows) < 2 ** 31 else "q", range(len(rows)))
    random.Random(seed).shuffle(perm)
    return rows[np.frombuffer(perm, dtype=f"i{perm.itemsize}")]


def _cut(sizes: np.ndarray, shard_samples: int, shard_bytes: int) -> np.ndarray:
    n = len(sizes)
    if shard_bytes <= 0:
        return np.append(np.arange(0, n, shard_samples), n).astype(np.int64)
    total = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    starts, s = [0], 0
    while s < n:  # as many images as fit in shard_bytes, at least one
        s = min(n, max(s + 1, int(np.searchsorted(total, total[s] + shard_bytes, side="right")) - 1))
        starts.append(s)
    return np.array(starts, np.int64)


def compute_plan(index, opts) -> Plan:
    train = index.tables["train"]
    wanted = set(opts.classes)
    if wanted:
        missing = sorted(wanted - {train.synsets[i] for i in np.unique(train.items.synset).tolist()})
        if missing:
            raise SourceError(f"{index.root}: classes not in the source: {', '.join(missing[:5])}")
    masks = {split: (np.array([s in wanted for s in t.synsets] or [False])[t.items.synset] if wanted
                     else np.ones(len(t.items), bool)) for split, t in index.tables.items()}
    classes = sorted(train.synsets[i] for i in np.unique(train.items.synset[masks["train"]]).tolist())
    orders = {split: check_unique_keys(index, split) for split in index.tables}
    if "validation" not in index.tables and opts.holdout > 0:
        held = _holdout(train, masks["train"], opts.seed, opts.holdout)
        chosen = {"train": ("train", masks["train"] & ~held), "validation": ("train", held)}
    else:
        chosen = {split: (split, mask) for split, mask in masks.items()}
    plan = Plan(classes, {}, {}, {})
    known = set(classes)
    for name, (source, mask) in chosen.items():
        table = index.tables[source]
        present = np.unique(table.items.synset[mask]).tolist()
        stray = sorted({table.synsets[i] for i in present} - known)
        if stray:
            raise SourceError(f"{index.root}: {name} images of classes with no training images: {stray[:5]}")
        order = orders[source]
        rows = _shuffled(order[mask[order]], f"{opts.seed}:{name}")
        plan.source_split[name], plan.rows[name] = source, rows
        plan.bounds[name] = _cut(table.items.size[rows], opts.shard_samples, opts.shard_bytes)
    return plan


def load_or_compute_plan(index, opts, progress: bool = False) -> Plan:
    """The stored plan for these options, else computed (and stored when the index is)."""
    fingerprint = opts.fingerprint()
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    path = index.folder / f"plan-{digest[:16]}.npz" if index.folder else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(f["meta"].tobytes())
            if meta["format"] == FORMAT and meta["options"] == json.loads(json.dumps(fingerprint)):
                return Plan(meta["classes"], dict(meta["source_split"]),
                            {s: f[f"{s}.rows"] for s in meta["source_split"]},
                            {s: f[f"{s}.bounds"] for s in meta["source_split"]})
    if progress:
        print(f"planning {sum(len(t.items) for t in index.tables.values()):,} images", flush=True)
    plan = compute_plan(index, opts)
    if path is not None:
        meta = {"format": FORMAT, "options": fingerprint, "classes": plan.classes,
                "source_split": plan.source_split}
        arrays = {f"{s}.{k}": v for s in plan.rows for k, v in (("rows", plan.rows[s]), ("bounds", plan.bounds[s]))}
        save_npz(path, meta, arrays)
    return plan
