"""The listing of a source as columns: numpy arrays and packed strings, never one Python object per
image (14M of them for ImageNet-22k would cost about 6 GiB; as columns it is about 45 bytes each).

A file name is stored as its sample key plus a "tail" (the `.JPEG` suffix, shared through a small
table); the rare name that cannot be rebuilt that way (directories, several dots) is kept whole
in `odd_names`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from .sources import SourceError, sample_key

NO_TAIL = np.iinfo(np.uint16).max  # the name is in `odd_names`
FLUSH_ROWS = 1 << 16  # rows a builder keeps as Python objects before packing them


def _encode(text: str) -> bytes:
    # tarfile decodes member names with surrogateescape: keep their bytes as they were.
    return text.encode("utf-8", "surrogateescape")


def key_and_tail(name: str) -> tuple[str, str | None]:
    """The sample key of a member or file name, and the tail that rebuilds the name from it
    (`name == key + tail`), or None when it cannot."""
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1 and name.count(".") == 1 and "/" not in name:
        return name[:dot], name[dot:]  # the common case, without building a path object
    key = sample_key(PurePosixPath(name).stem)
    return key, (name[len(key):] if name.startswith(key) else None)


@dataclass
class Strings:
    """Packed strings: string i is `blob[ends[i-1]:ends[i]]`, UTF-8."""
    blob: np.ndarray  # uint8
    ends: np.ndarray  # unsigned, as narrow as the blob allows

    @classmethod
    def pack(cls, texts: list[bytes]) -> "Strings":
        lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        return cls(np.frombuffer(b"".join(texts), np.uint8).copy(), np.cumsum(lengths))

    @classmethod
    def empty(cls) -> "Strings":
        return cls(np.zeros(0, np.uint8), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    def raw(self, i: int) -> bytes:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[start:int(self.ends[i])].tobytes()

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode("utf-8", "surrogateescape")


@dataclass
class ItemTable:
    """The images of one split. `group` and `synset` index the index's tables, `tail` its tail
    table; `offset` is where the bytes start in the source file (tar layouts only)."""
    group: np.ndarray  # ids and sizes: the narrowest unsigned type that holds them
    synset: np.ndarray
    size: np.ndarray
    offset: np.ndarray  # int64, empty when the layout has no offsets
    keys: Strings
    tail: np.ndarray  # uint16, NO_TAIL: see odd_rows / odd_names
    odd_rows: np.ndarray  # int64, ascending
    odd_names: Strings

    def __len__(self) -> int:
        return len(self.size)

    def name(self, row: int, tails: list[str]) -> str:
        t = int(self.tail[row])
        if t != NO_TAIL:
            return self.keys[row] + tails[t]
        return self.odd_names[int(np.searchsorted(self.odd_rows, row))]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The columns for np.savez, named `prefix.column`."""
        cols = dict(group=self.group, synset=self.synset, size=self.size, offset=self.offset,
                    key_blob=self.keys.blob, key_ends=self.keys.ends, tail=self.tail,
                    odd_rows=self.odd_rows, odd_blob=self.odd_names.blob, odd_ends=self.odd_names.ends)
        return {f"{prefix}.{k}": v for k, v in cols.items()}

    @classmethod
    def from_arrays(cls, load, prefix: str) -> "ItemTable":
        """`load(name)` returns the array saved as `prefix.name`."""
        get = lambda k: load(f"{prefix}.{k}")  # noqa: E731
        return cls(get("group"), get("synset"), get("size"), get("offset"),
                   Strings(get("key_blob"), get("key_ends")), get("tail"), get("odd_rows"),
                   Strings(get("odd_blob"), get("odd_ends")))


@dataclass
class Table:
    """An `ItemTable` with its own group, synset and tail tables: what a listing produces, before
    it is merged into an index (where the ids are remapped to the index's tables)."""
    items: ItemTable
    groups: list[str]
    synsets: list[str]
    tails: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict:
        """What merging it needs to know before loading it."""
        it = self.items
        return dict(rows=len(it), key_bytes=len(it.keys.blob), odd_rows=len(it.odd_rows),
                    odd_bytes=len(it.odd_names.blob), offsets=len(it.offset), groups=len(self.groups),
                    synsets=len(self.synsets), max_size=int(it.size.max()) if len(it) else 0)


def _narrow(upper: int, wide=np.int64):
    """The smallest unsigned type that holds 0..upper (ids, sizes, string ends), or `wide`."""
    for dtype in (np.uint16, np.uint32):
        if upper < np.iinfo(dtype).max:
            return dtype
    return wide


@dataclass
class TableBuilder:
    """Collects images and packs them into columns every FLUSH_ROWS rows."""
    with_offsets: bool
    groups: list[str] = field(default_factory=list)
    synsets: dict[str, int] = field(default_factory=dict)
    tails: dict[str, int] = field(default_factory=dict)
    _cols: tuple = field(default_factory=lambda: ([], [], [], [], [], [], []))
    _packed: list[Table] = field(default_factory=list)

    def add_group(self, prefix: str) -> int:
        self.groups.append(prefix)
        return len(self.groups) - 1

    def add(self, group: int, synset: str, name: str, size: int, offset: int = -1) -> None:
        self.add_files(group, synset, [(name, size, offset)])

    def add_files(self, group: int, synset: str, files) -> None:
        """`files`: (name, size, offset) of images of one group and synset."""
        sid = self.synsets.setdefault(synset, len(self.synsets))
        groups, sids, sizes, offsets, keys, tids, odd = self._cols
        tails = self.tails
        for name, size, offset in files:
            key, tail = key_and_tail(name)
            tid = tails.get(tail, NO_TAIL) if tail is not None else NO_TAIL
            if tid == NO_TAIL and tail is not None and len(tails) < NO_TAIL:
                tid = tails[tail] = len(tails)
            if tid == NO_TAIL:
                odd.append((len(keys), _encode(name)))
            groups.append(group)
            sids.append(sid)
            sizes.append(size)
            offsets.append(offset)
            keys.append(_encode(key))
            tids.append(tid)
        if len(keys) >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        groups, sids, sizes, offsets, keys, tids, odd = self._cols
        self._cols = ([], [], [], [], [], [], [])
        items = ItemTable(np.array(groups, np.int64), np.array(sids, np.int64), np.array(sizes, np.int64),
                          np.array(offsets, np.int64) if self.with_offsets else np.zeros(0, np.int64),
                          Strings.pack(keys), np.array(tids, np.uint16),
                          np.array([r for r, _ in odd], np.int64), Strings.pack([n for _, n in odd]))
        self._packed.append(Table(items, [], [], []))

    def build(self) -> Table:
        self._flush()
        tables = [Table(t.items, self.groups, list(self.synsets), list(self.tails)) for t in self._packed]
        return concat_tables([lambda t=t: t for t in tables], [t.counts() for t in tables],
                             shared_groups=True)


def concat_tables(loaders, counts: list[dict], shared_groups: bool = False) -> Table:
    """Concatenate tables into preallocated columns of the narrowest types, loading one table at
    a time (`loaders[i]()`), so that merging the parts of a 14M-image index never holds it twice.
    Groups are concatenated (each table has its own) unless `shared_groups`; synsets and tails
    are merged by name."""
    total = {k: sum(c[k] for c in counts) for k in ("rows", "key_bytes", "odd_rows", "odd_bytes", "offsets")}
    n = total["rows"]
    num_groups = max((c["groups"] for c in counts), default=0) if shared_groups else \
        sum(c["groups"] for c in counts)
    out = ItemTable(np.empty(n, _narrow(num_groups)), np.empty(n, _narrow(sum(c["synsets"] for c in counts))),
                    np.empty(n, _narrow(max((c["max_size"] for c in counts), default=0))),
                    np.empty(total["offsets"], np.int64),
                    Strings(np.empty(total["key_bytes"], np.uint8), np.empty(n, _narrow(total["key_bytes"]))),
                    np.empty(n, np.uint16), np.empty(total["odd_rows"], np.int64),
                    Strings(np.empty(total["odd_bytes"], np.uint8),
                            np.empty(total["odd_rows"], _narrow(total["odd_bytes"]))))
    groups: list[str] = []
    synsets: dict[str, int] = {}
    tails: dict[str, int] = {}
    at = dict(rows=0, key_bytes=0, odd_rows=0, odd_bytes=0, offsets=0)
    for load in loaders:
        table = load()
        t, r = table.items, at["rows"]
        m = len(t)
        group_base = 0 if shared_groups and groups else len(groups)
        if not (shared_groups and groups):
            groups.extend(table.groups)
        sid = np.array([synsets.setdefault(s, len(synsets)) for s in table.synsets] or [0], np.int64)
        tid = np.array([tails.setdefault(s, len(tails)) for s in table.tails] + [NO_TAIL], np.int64)
        if len(tails) >= NO_TAIL:  # tails are "" or ".EXT": only a pathological source gets here
            raise SourceError(f"source listing: more than {NO_TAIL - 1} distinct file-name endings")
        out.group[r:r + m] = t.group.astype(np.int64) + group_base
        out.synset[r:r + m] = sid[t.synset]
        out.size[r:r + m] = t.size
        out.offset[at["offsets"]:at["offsets"] + len(t.offset)] = t.offset
        out.tail[r:r + m] = tid[np.minimum(t.tail, len(tid) - 1)]
        _copy_strings(out.keys, t.keys, r, at["key_bytes"])
        _copy_strings(out.odd_names, t.odd_names, at["odd_rows"], at["odd_bytes"])
        out.odd_rows[at["odd_rows"]:at["odd_rows"] + len(t.odd_rows)] = t.odd_rows + r
        for k in at:
            at[k] += table.counts()[k]
    return Table(out, groups, list(synsets), list(tails))


def _copy_strings(dst: Strings, src: Strings, row: int, byte: int) -> None:
    dst.blob[byte:byte + len(src.blob)] = src.blob
    dst.ends[row:row + len(src.ends)] = src.ends.astype(np.int64) + byte
