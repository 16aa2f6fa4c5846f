"""Converting a checkpoint for another number of ranks: DeepSpeed's `ds_to_universal`, run before
any process group exists (so no collective timeout applies), atomically, and as a command that can
run ahead of the job:

    python -m cvtkit.train.reshard runs/cvt_w24_224_in22k      # or: cvtkit-reshard RUN_FOLDER

The conversion writes `<tag>_universal.partial/` and renames it to `<tag>_universal/` once it is
complete (with `COMPLETE` inside): a complete folder is reused by every later start, a partial one
(a killed conversion) is replaced. On a job start, rank 0 converts while the other ranks wait for
the folder (or for rank 0's failure) up to `checkpoint.convert_timeout_s`.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from cvtkit.atomic import write_text_atomic
from cvtkit.checkpoint import (COMPLETE, PARTIAL_SUFFIX, ResumeError, find_tag_folder, refuse_unsafe_pickles,
                               universal_folder)
from cvtkit.errors import CvtkitError

log = logging.getLogger(__name__)


def convert(ckpt_dir: Path, tag: str, workers: int = 1) -> Path:
    """`<tag>_universal` for `tag` (converted now, or reused when complete)."""
    target = universal_folder(ckpt_dir, tag)
    if (target / COMPLETE).is_file():
        return target
    refuse_unsafe_pickles(ckpt_dir / tag)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # without COMPLETE: never a usable conversion
    log.warning("checkpoint %s was written by another number of ranks: converting it with "
                "deepspeed.checkpoint.ds_to_universal", ckpt_dir / tag)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt_dir / tag), "--output_folder", str(partial), "--num_extract_workers",
                           str(workers), "--num_merge_workers", str(workers)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ResumeError(f"{ckpt_dir / tag}: conversion to a universal checkpoint failed: {tail}")
    write_text_atomic(partial / COMPLETE, "universal\n")
    os.replace(partial, target)
    return target


def _attempt_id() -> str:
    """Shared by the ranks of one start (same job, restart and rendezvous), differs between starts."""
    keys = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    return hashlib.sha256("|".join(os.environ.get(k, "") for k in keys).encode()).hexdigest()[:12]


def convert_on_start(ckpt_dir: Path, tag: str, rank: int, timeout_s: float, poll_s: float = 2.0) -> Path:
    """Rank 0 converts; every other rank waits for the complete folder, or for rank 0's failure, up
    to `timeout_s`. No process group is needed (none exists yet)."""
    target = universal_folder(ckpt_dir, tag)
    failed = ckpt_dir / f".{target.name}.failed.{_attempt_id()}"
    if rank == 0:
        try:
            return convert(ckpt_dir, tag)
        except ResumeError as e:
            write_text_atomic(failed, str(e))
            raise
    deadline = time.monotonic() + timeout_s
    while not (target / COMPLETE).is_file():
        if failed.is_file():
            raise ResumeError(f"rank 0 failed to convert {ckpt_dir / tag}: {failed.read_text().strip()}")
        if time.monotonic() > deadline:
            raise ResumeError(f"{target}: not converted within checkpoint.convert_timeout_s={timeout_s:.0f}; "
                              f"convert it ahead of the job: python -m cvtkit.train.reshard {ckpt_dir.parent}")
        time.sleep(poll_s)
    return target


def untie_step_counts(optimizer) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal loading hands every sub-group of the optimizer one and
    the same `step` tensor, which torch's Adam then advances in place once per sub-group: the step
    count, and with it Adam's bias correction, would run ahead by the number of sub-groups at every
    update after a change of world size. Each state gets a step count of its own."""
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def main(argv: list[str] | None = None) -> int:
    """`cvtkit-reshard RUN_OR_CHECKPOINT`: convert the newest complete checkpoint of a run (or the
    tag folder given) to a universal one, which any number of ranks can resume."""
    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("path", help="a run folder, its checkpoints/ folder or a tag folder")
    p.add_argument("--workers", type=int, default=1, help="ds_to_universal's extract and merge workers")
    args = p.parse_args(argv)
    try:
        tag_dir = find_tag_folder(args.path)
        if tag_dir is None:
            raise ResumeError(f"{args.path}: not a run folder or a DeepSpeed checkpoint")
        start = time.monotonic()
        target = convert(tag_dir.parent, tag_dir.name, args.workers)
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        return e.exit_code
    print(f"{target} ({time.monotonic() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
