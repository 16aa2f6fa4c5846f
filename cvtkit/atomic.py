"""Files written whole or not at all: into a hidden temporary beside the target, fsynced, then
renamed over it, so that a kill at any moment leaves the old file or the new one, never half."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", owner: str | None = None):
    """`with atomic_open(path, "wb") as f: ...`; `owner` names the temporary (default: the pid),
    e.g. host and pid where several machines write into one shared folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{owner or os.getpid()}")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
