"""Finding the images of an ImageNet source, in any of its distributed layouts.

- `folder22k`: `ROOT/<synset>/*.JPEG` (extracted ImageNet-22k);
- `tar22k`: `fall11_whole.tar` / `winter21_whole.tar`, a tar of per-synset tars, read in place by
  offset (never extracted);
- `targz22k`: the same compressed (`winter21_whole.tar.gz`), read as a stream (see `prep.spool`);
- `imagenet1k`: `ROOT/train/<synset>/*.JPEG` and `ROOT/val/`, the latter as synset folders or flat
  files labelled by `LOC_val_solution.csv` or a `filename label` list.
Every item is located, not read: workers read the bytes themselves, in parallel. This module
recognises layouts and defines the items; `listing` lists them (in parallel, as columns) and
`source_index` keeps that listing in the output folder so that it is made once per job.
"""
from __future__ import annotations

import csv
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cvtkit.errors import CvtkitError

SYNSET = re.compile(r"^n\d{8}$")
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


def synset_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and SYNSET.match(p.name))


def unsafe_member(name: str) -> str | None:
    p = PurePosixPath(name)
    if p.is_absolute():
        return "absolute path in tar member"
    if ".." in p.parts:
        return "'..' in tar member path"
    return None


def outer_member_refusal(name: str) -> str | None:
    """Why a member of a tar of tars is refused (unsafe, or not a per-synset `nXXXXXXXX.tar`),
    or None."""
    reason = unsafe_member(name)
    path = PurePosixPath(name)
    if not reason and (path.suffix != ".tar" or not SYNSET.match(path.stem)):
        reason = "not a per-synset tar (nXXXXXXXX.tar)"
    return reason


def iter_stream_tar_of_tars(path: Path, on_progress=None):
    """Stream a compressed tar of per-synset tars, once, in order.

    Yields `(outer_member, inner_member, data)` for every image, or `(name, reason, None)` for a
    member refused for safety. One inner tar is held in memory at a time. `on_progress(n)` is
    called with the compressed bytes read so far, once per outer member."""
    import io

    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as outer:
        for member in outer:
            if on_progress:
                on_progress(raw.tell())
            if not member.isfile():
                continue
            reason = outer_member_refusal(member.name)
            if reason:
                yield member.name, reason, None
                continue
            data = outer.extractfile(member).read()
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as inner:
                for m in inner:
                    if not m.isfile():
                        continue
                    reason = unsafe_member(m.name)
                    if reason:
                        yield f"{member.name}:{m.name}", reason, None
                    else:
                        yield member.name, m.name, inner.extractfile(m).read()


class TarWindow:
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


def val_labels_file(root: Path, labels_file: Path | None) -> Path:
    """The labels file of a flat val/ folder: the one given, or the first of VAL_LABEL_FILES."""
    candidates = [labels_file] if labels_file else [root / n for n in VAL_LABEL_FILES] + \
        [root / "val" / n for n in VAL_LABEL_FILES]
    found = next((c for c in candidates if c and c.is_file()), None)
    if found is None:
        names = ", ".join(VAL_LABEL_FILES)
        raise SourceError(f"{root / 'val'}: flat validation images need a labels file ({names}, or --val-labels)")
    return found


def read_val_labels(found: Path) -> dict[str, str]:
    """`{file stem: synset}` from LOC_val_solution.csv or a `filename label` list."""
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
    if (root / "train").is_dir() and synset_dirs(root / "train"):
        return "imagenet1k"
    if synset_dirs(root):
        return "folder22k"
    raise SourceError(f"{root}: unrecognised layout: expected <synset>/ folders (22k), "
                      f"train/<synset>/ (+ val/) folders (1k), or a tar of <synset>.tar files")


def has_flat_val(root: Path) -> bool:
    """An imagenet1k source whose val/ holds the images directly (labelled by a file)."""
    return (root / "val").is_dir() and not synset_dirs(root / "val")
