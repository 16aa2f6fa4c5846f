"""Index files for DALI's webdataset reader, made on first use by DALI's `wds2idx` and cached.

Where: `_dali_index/` beside the shards when that folder can be written, else a cache folder
(`$CVTKIT_CACHE`, else `$XDG_CACHE_HOME/cvtkit`, else `~/.cache/cvtkit`) under `dali-index/`,
keyed by the shard's resolved path. Either way the file name carries the shard's size and
modification time, so a rewritten shard gets a new index instead of a stale one. Each index is
written to a temporary file in its folder and renamed into place: concurrent ranks making the
same index race harmlessly, and a killed run leaves no partial index behind.

The reader trusts the index, so what `wds2idx` lists is checked before it is kept: a sample
without both `jpg` and `cls`, one that runs past the end of the file (a truncated shard), or
whose `jpg` is not a JPEG that libjpeg-turbo reads the header of, is left out and counted as
damaged. A file that is no tar at all gives no index: the loader skips that shard and counts it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cvtkit.errors import CvtkitError

INDEX_FOLDER = "_dali_index"
HEADER_BYTES = 65536  # enough for a JPEG's header segments (EXIF included) up to its frame size


@dataclass(frozen=True)
class ShardIndex:
    """A checked index: its path, and the samples it keeps and leaves out."""
    path: str
    samples: int
    dropped: int


class UnindexableShard(CvtkitError):
    """wds2idx could not list the shard (not a tar, empty): the shard is skipped."""


class IndexFolderError(CvtkitError):
    """No index exists and there is nowhere to write one."""


def cache_root() -> Path:
    if os.environ.get("CVTKIT_CACHE"):
        return Path(os.environ["CVTKIT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "cvtkit"
    return Path.home() / ".cache" / "cvtkit"


def index_locations(shard: Path) -> tuple[Path, Path]:
    """(beside the shard, in the cache): where the index of `shard` may live."""
    stat = shard.stat()
    name = f"{shard.name}.{stat.st_size}-{stat.st_mtime_ns}.idx"
    key = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    return shard.parent / INDEX_FOLDER / name, cache_root() / "dali-index" / key / name


def _writable(folder: Path) -> bool:
    """Whether files can be made in `folder` (made if absent): tried, since permission bits do
    not tell (root ignores them; a read-only mount does not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
    except OSError:  # read-only file system, no permission
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def shard_index(shard: str | Path) -> ShardIndex:
    """The checked index of one shard, made and cached on first use."""
    shard = Path(shard)
    beside, cached = index_locations(shard)
    target = next((p for p in (beside, cached) if p.is_file()), None)
    if target is None:
        if _writable(beside.parent):
            target = beside
        elif _writable(cached.parent):
            target = cached
        else:
            raise IndexFolderError(f"{shard}: no DALI index, and none can be written beside it nor in "
                                   f"{cached.parent} (set CVTKIT_CACHE to a writable folder)")
        _make(shard, target)
    header = target.read_text().split("\n", 1)[0].split()
    kept, dropped = int(header[1]), int(header[2]) if len(header) > 2 else 0
    return ShardIndex(str(target), kept, dropped)


def _make(shard: Path, target: Path) -> None:
    fd, raw = tempfile.mkstemp(dir=target.parent, prefix=f".{shard.name}.", suffix=".wds2idx")
    os.close(fd)
    try:
        done = subprocess.run([sys.executable, "-m", "wds2idx", str(shard), raw], capture_output=True,
                              text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UnindexableShard(f"{shard}: DALI's wds2idx cannot index it ({last})")
        lines = Path(raw).read_text().split("\n")[1:]
        kept = [line for line in lines if line.strip() and _readable(shard, line)]
        dropped = sum(1 for line in lines if line.strip()) - len(kept)
        # "v1.2 N" is DALI's header; the third field (the samples left out) is ours, DALI ignores it.
        Path(raw).write_text(f"v1.2 {len(kept)} {dropped}\n" + "\n".join(kept) + "\n")
        os.replace(raw, target)
    finally:
        if os.path.exists(raw):
            os.unlink(raw)


def _components(line: str) -> dict[str, tuple[int, int]]:
    """`ext offset size filename ...` -> {ext: (offset, size)}."""
    fields = line.split()
    return {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields) - 3, 4)}


def _readable(shard: Path, line: str) -> bool:
    import simplejpeg
    parts = _components(line)
    if "jpg" not in parts or "cls" not in parts:
        return False
    end = shard.stat().st_size
    if any(offset + size > end for offset, size in parts.values()):
        return False  # the shard ends inside this sample
    offset, size = parts["jpg"]
    with open(shard, "rb") as f:
        f.seek(offset)
        head = f.read(min(size, HEADER_BYTES))
        f.seek(offset + max(0, size - 64))
        tail = f.read(min(size, 64))
    try:
        simplejpeg.decode_jpeg_header(head)
    except ValueError:  # not a JPEG (or its header is damaged)
        return False
    # The end-of-image marker near the end (some encoders pad after it), as data preparation checks.
    return b"\xff\xd9" in tail
