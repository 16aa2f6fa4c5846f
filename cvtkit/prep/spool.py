"""A compressed source (`winter21_whole.tar.gz`) cannot be read at random: before writing, stream
it once more and append each image of a shard still to write to `_spool/<shard>.bin`.

The stream yields the images in the order of the index (it was listed from the same stream), so
row r of the index is the r-th image streamed; every name is checked against the index on the way.
The spool holds the remaining shards' source bytes and is deleted as they are written. A kill
during this pass redoes it; finished shards are never spooled again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .sources import SourceError, iter_stream_tar_of_tars

MAX_OPEN = 256  # spool files open at once: far below the open-file limit


def spool(index, rows_of: dict[str, np.ndarray], spool_dir: Path, progress: bool) -> dict[str, tuple[str, np.ndarray]]:
    """`rows_of`: shard name -> its rows of the index's train table. Returns, per shard, its
    spool file and each row's offset in it."""
    spool_dir.mkdir(exist_ok=True)
    names = list(rows_of)
    table = index.tables["train"]
    target = np.full(len(table.items), -1, np.int32)
    for t, name in enumerate(names):
        target[rows_of[name]] = t
    files = [spool_dir / f"{name}.bin" for name in names]
    for f in files:
        f.write_bytes(b"")
    offsets = np.full(len(table.items), -1, np.int64)
    sizes = [0] * len(names)
    handles: dict[int, object] = {}
    total = int(sum(table.items.size[rows].sum() for rows in rows_of.values()))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"spooling {index.root.name}",
               disable=not progress, dynamic_ncols=True)
    row = 0
    try:
        for outer_name, inner_name, data in iter_stream_tar_of_tars(index.root):
            if data is None:
                continue
            if row >= len(table.items) or index.filename("train", row) != f"{outer_name}:{inner_name}":
                raise SourceError(f"{index.root}: changed since it was listed "
                                  f"({outer_name}:{inner_name} is not where the index has it)")
            t = int(target[row])
            if t >= 0:
                if t not in handles:
                    if len(handles) >= MAX_OPEN:
                        for h in handles.values():
                            h.close()
                        handles.clear()
                    handles[t] = open(files[t], "ab")
                handles[t].write(data)
                offsets[row] = sizes[t]
                sizes[t] += len(data)
                bar.update(len(data))
            row += 1
    finally:
        for h in handles.values():
            h.close()
        bar.close()
    if row != len(table.items):
        raise SourceError(f"{index.root}: changed since it was listed ({len(table.items) - row} images "
                          f"of the index not found again)")
    return {name: (str(files[t]), offsets[rows_of[name]]) for t, name in enumerate(names)}
