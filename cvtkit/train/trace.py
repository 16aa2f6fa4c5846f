"""`data.trace`: which samples each optimizer step trained on, in `RUN/trace.jsonl` (rank 0), one
line per step: `{"step": s, "keys": [...]}`, the keys of the step's global batch in micro-batch
order (rank 0's micro-batches, then rank 1's, ...: with the slot layout, the same list on any
number of ranks). A resumed run keeps the lines up to its checkpoint's step and rewrites the rest.
A loss-spike rollback (`guard.py`) keeps the lines of the steps it undid, followed by those of the
steps taken again, and lists the undone steps' keys in its `events.jsonl` line (`keys_since`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

TRACE_FILE = "trace.jsonl"


class StepTrace:
    """Collects a rank's sample keys over a step; `end_step` gathers every rank's on rank 0, which
    appends the step's line. Inactive (nothing gathered, nothing written) unless `enabled`."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool, step: int):
        self.path, self.rank, self.enabled = Path(run_dir) / TRACE_FILE, rank, enabled
        self.keys: list[str] = []
        if enabled and rank == 0:
            kept = []
            if self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(line + "\n" for line in kept))

    def add(self, batch: tuple) -> None:
        """A micro-batch as the loader gives it: (images, labels, keys)."""
        if self.enabled:
            self.keys += batch[2]

    def end_step(self, step: int) -> None:
        if not self.enabled:
            return
        gathered = [None] * dist.get_world_size() if dist.is_initialized() else [self.keys]
        if dist.is_initialized():
            dist.all_gather_object(gathered, self.keys)
        self.keys = []
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "keys": [k for keys in gathered for k in keys]}) + "\n")

    def keys_since(self, step: int) -> list[str]:
        """Rank 0: the keys of the steps taken after `step`, in order, read back from the end of the
        file (the newest lines; earlier lines of the same steps were undone by a rollback); none
        unless enabled, and only the steps traced since the trace was turned on."""
        if not (self.enabled and self.rank == 0):
            return []
        found = []
        for line in _lines_backwards(self.path):
            record = json.loads(line)
            if record["step"] <= step:
                break
            found.append(record["keys"])
        return [k for keys in reversed(found) for k in keys]


def _lines_backwards(path: Path, block: int = 1 << 20):
    """The file's lines from the last to the first, read a block at a time from its end: a long
    run's trace is large, and a rollback needs only its last checkpoint interval."""
    with open(path, "rb") as f:
        pos, rest = f.seek(0, os.SEEK_END), b""
        while pos > 0:
            size = min(block, pos)
            pos -= size
            f.seek(pos)
            lines = (f.read(size) + rest).split(b"\n")
            rest = lines.pop(0)  # the start of a line that began in the block before, unless pos is 0
            yield from (line.decode() for line in reversed(lines) if line)
        if rest:
            yield rest.decode()
