"""Finding the images of an ImageNet source, in any of its distributed layouts.

- `folder22k`: `ROOT/<synset>/*.JPEG` (extracted ImageNet-22k);
- `tar22k`: `fall11_whole.tar` / `winter21_whole.tar`, a tar of per-synset tars, read in place by
  offset (never extracted);
- `targz22k`: the same compressed (`winter21_whole.tar.gz`), read as a stream (see `prep.spool`);
- `imagenet1k`: `ROOT/train/<synset>/*.JPEG` and `ROOT/val/`, the latter as synset folders or flat
  files labelled by `LOC_val_solution.csv` or a `filename label` list.
Every item is located, not read: workers read the bytes themselves, in parallel.
"""
from __future__ import annotations

import csv
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cvtkit.errors import CvtkitError

SYNSET = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
STREAMED = -2
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "ILSVRC2012_validation_labels.txt")


class SourceError(CvtkitError, ValueError):
    """A source that cannot be used; the message names the path and what was expected."""


@dataclass(frozen=True, slots=True)  # 14M of them for 22k: no per-instance __dict__
class Item:
    """One image of the source. `offset >= 0`: `size` bytes at `offset` inside the file `path`;
    `offset == STREAMED`: inside a compressed stream, readable only once spooled."""
    synset: str
    key: str  # unique sample key (file stem, no dots)
    filename: str  # path relative to the source, for the json record and the report
    path: str
    size: int
    offset: int = -1

    def read(self) -> bytes:
        if self.offset == STREAMED:
            raise RuntimeError(f"{self.filename}: a streamed item must be spooled before reading")
        with open(self.path, "rb") as f:
            if self.offset >= 0:
                f.seek(self.offset)
                return f.read(self.size)
            return f.read()


@dataclass
class Source:
    layout: str
    root: Path
    splits: dict[str, list[Item]]  # "train" (and "validation" for 1k)
    rejected: list[tuple[str, str]]  # (name, reason): members refused before reading


def sample_key(stem: str) -> str:
    # webdataset splits a sample's files on the first dot of the name.
    return stem.replace(".", "_")


def _scan_synset_dir(root: Path, synset_dir: Path, synset: str) -> list[Item]:
    items = []
    with os.scandir(synset_dir) as entries:
        for e in entries:
            if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(synset, sample_key(Path(e.name).stem), str(Path(e.path).relative_to(root)),
                                  e.path, e.stat().st_size))
    return items


def _synset_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and SYNSET.match(p.name))


def _unsafe_member(name: str) -> str | None:
    p = PurePosixPath(name)
    if p.is_absolute():
        return "absolute path in tar member"
    if ".." in p.parts:
        return "'..' in tar member path"
    return None


def iter_stream_tar_of_tars(path: Path):
    """Stream a compressed tar of per-synset tars, once, in order.

    Yields `(outer_member, inner_member, data)` for every image, or `(name, reason, None)` for a
    member refused for safety. One inner tar is held in memory at a time."""
    import io

    with tarfile.open(path, "r|*") as outer:
        for member in outer:
            if not member.isfile():
                continue
            reason = _unsafe_member(member.name)
            name = PurePosixPath(member.name)
            if not reason and (name.suffix != ".tar" or not SYNSET.match(name.stem)):
                reason = "not a per-synset tar (nXXXXXXXX.tar)"
            if reason:
                yield member.name, reason, None
                continue
            data = outer.extractfile(member).read()
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as inner:
                for m in inner:
                    if not m.isfile():
                        continue
                    reason = _unsafe_member(m.name)
                    if reason:
                        yield f"{member.name}:{m.name}", reason, None
                    else:
                        yield member.name, m.name, inner.extractfile(m).read()


def _scan_stream(path: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """List a compressed tar of tars. The items cannot be read in place (`offset = -2`): the
    preparation spools them by shard in a second streaming pass."""
    items, rejected = [], []
    for outer_name, inner_name, data in iter_stream_tar_of_tars(path):
        if data is None:
            rejected.append((outer_name, inner_name))
            continue
        synset = PurePosixPath(outer_name).stem
        items.append(Item(synset, sample_key(PurePosixPath(inner_name).stem), f"{outer_name}:{inner_name}",
                          str(path), len(data), offset=STREAMED))
    return items, rejected


def _scan_tar_of_tars(path: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    items, rejected = [], []
    with tarfile.open(path, "r:") as outer:
        for member in outer:
            if not member.isfile():
                continue
            reason = _unsafe_member(member.name)
            if reason:
                rejected.append((member.name, reason))
                continue
            name = PurePosixPath(member.name)
            if name.suffix != ".tar" or not SYNSET.match(name.stem):
                rejected.append((member.name, "not a per-synset tar (nXXXXXXXX.tar)"))
                continue
            base = member.offset_data
            outer.fileobj.seek(base)
            with tarfile.open(fileobj=_Window(outer.fileobj, base, member.size), mode="r:") as inner:
                for m in inner:
                    if not m.isfile():
                        continue
                    label = f"{member.name}:{m.name}"
                    reason = _unsafe_member(m.name)
                    if reason:
                        rejected.append((label, reason))
                        continue
                    stem = PurePosixPath(m.name).stem
                    items.append(Item(name.stem, sample_key(stem), label, str(path), m.size,
                                      base + m.offset_data))
    return items, rejected


class _Window:
    """A read-only view of `size` bytes at `start` of a seekable file (an inner tar)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def _val_labels(root: Path, labels_file: Path | None) -> dict[str, str]:
    """`{file stem: synset}` from LOC_val_solution.csv or a `filename label` list."""
    candidates = [labels_file] if labels_file else [root / n for n in VAL_LABEL_FILES] + \
        [root / "val" / n for n in VAL_LABEL_FILES]
    found = next((c for c in candidates if c and c.is_file()), None)
    if found is None:
        names = ", ".join(VAL_LABEL_FILES)
        raise SourceError(f"{root / 'val'}: flat validation images need a labels file ({names}, or --val-labels)")
    labels = {}
    if found.suffix == ".csv":
        with open(found, newline="") as f:
            for row in csv.DictReader(f):
                labels[Path(row["ImageId"]).stem] = row["PredictionString"].split()[0]
    else:
        for n, line in enumerate(found.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not SYNSET.match(parts[1]):
                raise SourceError(f"{found}:{n}: expected 'filename synset', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    return labels


def _scan_flat_val(root: Path, labels_file: Path | None) -> list[Item]:
    labels = _val_labels(root, labels_file)
    items = []
    for p in sorted((root / "val").iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem not in labels:
                raise SourceError(f"{p}: no label for this validation image in the labels file")
            items.append(Item(labels[p.stem], sample_key(p.stem), str(p.relative_to(root)), str(p),
                              p.stat().st_size))
    return items


def detect_layout(root: Path) -> str:
    if not root.exists():
        raise SourceError(f"{root}: source not found")
    if root.is_file():
        try:
            is_tar = tarfile.is_tarfile(root)
        except (EOFError, OSError, tarfile.TarError, zlib.error):
            is_tar = False  # a damaged compressed file
        if is_tar:
            with open(root, "rb") as f:
                magic = f.read(6)
            compressed = magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"
            return "targz22k" if compressed else "tar22k"
        raise SourceError(f"{root}: not a tar file nor a folder")
    if (root / "train").is_dir() and _synset_dirs(root / "train"):
        return "imagenet1k"
    if _synset_dirs(root):
        return "folder22k"
    raise SourceError(f"{root}: unrecognised layout: expected <synset>/ folders (22k), "
                      f"train/<synset>/ (+ val/) folders (1k), or a tar of <synset>.tar files")


def scan(root: str | Path, val_labels: str | Path | None = None) -> Source:
    """Locate every image of the source at `root`; raise `SourceError` before any work starts."""
    root = Path(root)
    layout = detect_layout(root)
    rejected: list[tuple[str, str]] = []
    splits: dict[str, list[Item]] = {}
    if layout in ("tar22k", "targz22k"):
        try:
            splits["train"], rejected = (_scan_tar_of_tars if layout == "tar22k" else _scan_stream)(root)
        except (EOFError, OSError, tarfile.TarError, zlib.error) as e:
            raise SourceError(f"{root}: damaged tar ({type(e).__name__}: {e})") from None
    elif layout == "folder22k":
        splits["train"] = [i for d in _synset_dirs(root) for i in _scan_synset_dir(root, d, d.name)]
    else:
        splits["train"] = [i for d in _synset_dirs(root / "train") for i in _scan_synset_dir(root, d, d.name)]
        val = root / "val"
        if val.is_dir():
            dirs = _synset_dirs(val)
            splits["validation"] = ([i for d in dirs for i in _scan_synset_dir(root, d, d.name)] if dirs
                                    else _scan_flat_val(root, Path(val_labels) if val_labels else None))
    if not splits["train"]:
        raise SourceError(f"{root}: no images found ({layout} layout)")
    for split, items in splits.items():
        seen: dict[str, str] = {}
        for item in items:
            if item.key in seen:
                raise SourceError(f"{root}: two {split} images share the key {item.key!r}: "
                                  f"{seen[item.key]} and {item.filename}")
            seen[item.key] = item.filename
    return Source(layout, root, splits, rejected)
