"""Listing a source: first its units (the per-synset tars or folders), then each unit's images, as
columns. Units are independent, so workers list them in parallel; only a compressed stream is
read by one process, front to back.

Tar headers are read with one `os.pread` of 512 bytes per member, about ten times faster than
`tarfile`. Anything beyond plain ustar files and directories (GNU long names, pax headers,
sparse files, a bad checksum, a truncated tar) makes that tar be read by `tarfile` instead, so
the listing is always exactly what `tarfile` gives.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import tarfile
import zlib
from contextlib import nullcontext
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from .columns import Table, TableBuilder
from cvtkit.shards import IMAGE_SUFFIXES

from .sources import (SourceError, TarWindow, iter_stream_tar_of_tars, outer_member_refusal,
                      read_val_labels, synset_dirs, unsafe_member)

BLOCK = 512
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337),
                  (337, 345))
_PLAIN_NUMBER = re.compile(rb" *[0-7]* *(?:\0.*)?", re.S)  # what tarfile's nti() surely reads alike
_CANONICAL = re.compile(rb"(?:[0-7]{7}[\0 ]){3}(?:[0-7]{11}[\0 ]){2}[0-7]{6}\0 ")  # mode .. chksum
_NO_DEVICE = re.compile(rb"\0{16}|(?:[0-7]{7}[\0 ]){2}")
_ZERO_BLOCK = bytes(BLOCK)
STREAM_PART_GROUPS = 256  # outer members of a compressed stream per stored part
TAR_ERRORS = (EOFError, OSError, tarfile.TarError, zlib.error)


class Unit(NamedTuple):
    """A per-synset tar (`offset`, `size`: its bytes inside the source) or folder. `group` is the
    prefix of its images' file names; `synset` None: labelled per image (a flat val/ folder)."""
    split: str
    group: str
    synset: str | None
    offset: int = -1
    size: int = 0


class Workers:
    """A spawn pool started on first use; with one worker everything runs in this process."""

    def __init__(self, count: int):
        self.count = count
        self._pool = None

    def imap(self, fn, jobs, parallel: bool = True, ordered: bool = True):
        if self.count <= 1 or not parallel:
            return map(fn, jobs)
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.count)
        return (self._pool.imap if ordered else self._pool.imap_unordered)(fn, jobs)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


class _NotPlain(Exception):
    """A header that tarfile reads in a special way: tarfile lists this tar instead."""


def _read_block(fd: int, pos: int) -> bytes:
    return os.pread(fd, BLOCK, pos)


def _name(buf: bytes, start: int, end: int) -> str:
    if not buf[start]:
        return ""
    return buf[start:end].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


def _number(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _numbers(buf: bytes) -> tuple[int, int]:
    """(checksum, size) of a header whose number fields tarfile surely reads alike."""
    if _CANONICAL.fullmatch(buf, 100, 156) and _NO_DEVICE.fullmatch(buf, 329, 345):
        return int(buf[148:154], 8), int(buf[124:135], 8)  # what GNU tar and tarfile write
    plain = _PLAIN_NUMBER.fullmatch
    if not all(plain(buf, a, b) for a, b in _NUMBER_FIELDS):
        raise _NotPlain
    return _number(buf[148:156]), _number(buf[124:136])


def _plain_members(fd: int, base: int, size: int, tick=None) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of the tar at `base`, as tarfile's frombuf
    and next() would read them; raise _NotPlain for anything else."""
    members, pos = [], 0
    while True:
        if pos == size and pos > 0:
            return members  # tarfile: an empty header after the first member ends the tar
        if pos + BLOCK > size:
            raise _NotPlain  # empty, truncated or overrunning: tarfile decides
        buf = _read_block(fd, base + pos)
        if len(buf) != BLOCK:
            raise _NotPlain
        if buf == _ZERO_BLOCK:
            return members
        chksum, length = _numbers(buf)
        if chksum != 256 + int(np.frombuffer(buf, np.uint8).sum()) - sum(buf[148:156]):
            raise _NotPlain  # tarfile also accepts a signed checksum, or refuses the header
        kind, name = buf[156:157], _name(buf, 0, 100)
        if kind == b"5" or (kind == b"\0" and name.endswith("/")):
            pos += BLOCK  # a directory: tarfile skips no data after it
            continue
        if kind not in (b"0", b"\0"):
            raise _NotPlain
        prefix = _name(buf, 345, 500)
        members.append((f"{prefix}/{name}" if prefix else name, pos + BLOCK, length))
        pos += BLOCK + -(-length // BLOCK) * BLOCK
        if tick and len(members) % 256 == 0:
            tick(pos)


def _tarfile_members(f, base: int, size: int) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=TarWindow(f, base, size), mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def tar_members(root: Path, f, base: int, size: int, tick=None) -> list[tuple[str, int, int]]:
    """The regular files of the tar stored at `base` (`size` bytes) of the open source `f`:
    (name, offset of the data from `base`, size)."""
    try:
        try:
            return _plain_members(f.fileno(), base, size, tick)
        except _NotPlain:
            return _tarfile_members(f, base, size)
    except TAR_ERRORS as e:
        raise SourceError(f"{root}: damaged tar ({type(e).__name__}: {e})") from None


def outer_units(root: Path, tick=None) -> tuple[list[Unit], list[tuple[str, str]]]:
    """The per-synset tars of a tar of tars, and the members refused (with the reason)."""
    units, rejected = [], []
    with open(root, "rb") as f:
        members = tar_members(root, f, 0, os.fstat(f.fileno()).st_size, tick)
    for name, offset, size in members:
        reason = outer_member_refusal(name)
        if reason:
            rejected.append((name, reason))
        else:
            units.append(Unit("train", f"{name}:", PurePosixPath(name).stem, offset, size))
    return units, rejected


def folder_units(root: Path, layout: str, flat_val: bool) -> list[tuple[Unit, Path]]:
    """The synset folders (and a flat val/ folder) of a folder layout, each with its path."""
    if layout == "folder22k":
        return [(Unit("train", f"{d.name}/", d.name), d) for d in synset_dirs(root)]
    units = [(Unit("train", f"train/{d.name}/", d.name), d) for d in synset_dirs(root / "train")]
    if flat_val:
        units.append((Unit("validation", "val/", None), root / "val"))
    elif (root / "val").is_dir():
        units += [(Unit("validation", f"val/{d.name}/", d.name), d) for d in synset_dirs(root / "val")]
    return units


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1 and name.count(".") == 1:
        return name[dot:]
    return PurePosixPath(name).suffix


def _list_folder(root: Path, unit: Unit, builder: TableBuilder, labels: dict | None) -> None:
    group = builder.add_group(unit.group)
    folder = root / unit.group
    with os.scandir(folder) as entries:
        found = [(e.name, e.stat().st_size, -1) for e in entries
                 if e.is_file() and _suffix(e.name).lower() in IMAGE_SUFFIXES]
    if labels is None:
        builder.add_files(group, unit.synset, found)
        return
    for name, size, _ in sorted(found):
        stem = PurePosixPath(name).stem
        if stem not in labels:
            raise SourceError(f"{folder / name}: no label for this validation image in the labels file")
        builder.add(group, labels[stem], name, size)


def _list_inner_tar(root: Path, f, unit: Unit, builder: TableBuilder, rejected: list) -> None:
    group, files = builder.add_group(unit.group), []
    for name, offset, size in tar_members(root, f, unit.offset, unit.size):
        if name.startswith("/") or ".." in name:  # only then can it be unsafe
            reason = unsafe_member(name)
            if reason:
                rejected.append((unit.group + name, reason))
                continue
        files.append((name, size, unit.offset + offset))
    builder.add_files(group, unit.synset, files)


def list_units(job: tuple) -> tuple[dict[str, Table], list[tuple[str, str]]]:
    """A worker's job: `(root, layout, units, labels_file)` -> a table per split of the units'
    images, in order, and the members refused. One open of the source per job."""
    root, layout, units, labels_file = job
    root = Path(root)
    builders: dict[str, TableBuilder] = {}
    rejected: list[tuple[str, str]] = []
    with open(root, "rb") if layout == "tar22k" else nullcontext() as f:
        for unit in map(Unit._make, units):
            builder = builders.setdefault(unit.split, TableBuilder(with_offsets=layout == "tar22k"))
            if layout == "tar22k":
                _list_inner_tar(root, f, unit, builder, rejected)
            else:
                labels = read_val_labels(Path(labels_file)) if unit.synset is None else None
                _list_folder(root, unit, builder, labels)
    return {split: b.build() for split, b in builders.items()}, rejected


def list_stream(root: Path, on_progress=None):
    """A compressed tar of tars, front to back: yields `(table, rejected)` for every
    STREAM_PART_GROUPS outer members, then for the rest."""
    builder, rejected, groups, current = TableBuilder(with_offsets=False), [], 0, None
    try:
        for outer_name, inner_name, data in iter_stream_tar_of_tars(root, on_progress):
            if data is None:
                rejected.append((outer_name, inner_name))
                continue
            if outer_name != current:
                if groups == STREAM_PART_GROUPS:
                    yield builder.build(), rejected
                    builder, rejected, groups = TableBuilder(with_offsets=False), [], 0
                group, current = builder.add_group(f"{outer_name}:"), outer_name
                groups += 1
            builder.add(group, PurePosixPath(outer_name).stem, inner_name, len(data))
    except TAR_ERRORS as e:
        raise SourceError(f"{root}: damaged tar ({type(e).__name__}: {e})") from None
    yield builder.build(), rejected
