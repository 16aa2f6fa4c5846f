"""Resharding a real-size checkpoint on this machine: CvT-W24 (its full body; a 4-class head on tiny
shards) trained one step by 2 CPU ranks under ZeRO-2 bf16 and saved, converted with DeepSpeed's
`ds_to_universal` (`python -m cvtkit.train.reshard`), then loaded by 1 and by 4 ranks.

    python -m cvtkit.bench.resume_cost [--work DIR] [--keep]

Prints one table: wall time and peak resident memory (the largest of the ranks) of each phase,
measured with /usr/bin/time, and the checkpoint's size. Needs about 12 GB of memory and a few GB
of disk; takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvtkit.dist import launch_local

REPO = Path(__file__).resolve().parents[2]
SYNSETS = ["n01440764", "n01443537", "n02084071", "n04399382"]
W24 = ["model.name=cvt_w24", "model.options={}", "model.num_classes=4", "model.drop_path_rate=0.0",
       "data.res=64", "data.batch_size=8", "engine.micro_batch=2", "data.val=null", "engine.zero_stage=2",
       "schedule.epochs=null", "schedule.steps=1", "schedule.warmup_steps=0", "checkpoint.every_steps=1"]
_TIME = re.compile(r"^RSS_KB=(\d+) WALL_S=([\d.]+)$", re.M)


def make_shards(root: Path) -> Path:
    """4 classes x 8 tiny JPEGs, through the project's own shard writer."""
    import numpy as np
    from PIL import Image

    from cvtkit.prep.pipeline import PrepOptions, run
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):  # 32 training images: 4 steps of 8
        for synset in SYNSETS:
            folder = root / "src" / split / synset
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{synset}_{i}.JPEG", quality=90)
    run(PrepOptions(source=str(root / "src"), out=str(root / "shards"), shard_samples=8, workers=1), progress=False)
    return root / "shards"


def timed_ranks(nproc: int, argv: list[str], log: Path) -> tuple[float, float, list[int]]:
    """Run `nproc` training ranks, each under /usr/bin/time; returns (wall s, peak GiB of the
    largest rank, exit codes)."""
    cmd = ["/usr/bin/time", "-f", "RSS_KB=%M WALL_S=%e", sys.executable, str(REPO / "pretrain/train.py"), *argv]
    start = time.monotonic()
    procs = launch_local(nproc, cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - start
    log.write_text("\n".join(outs))
    rss = [int(m.group(1)) for out in outs for m in _TIME.finditer(out)]
    return wall, max(rss, default=0) / 2**20, [p.returncode for p in procs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="cvtkit-reshard-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shards = make_shards(work)
        base = ["--config", str(REPO / "configs/pretrain/tiny_cpu.yaml"), "--set", f"data.train={shards}",
                f"out_dir={work / 'runs'}", "name=w24", *W24]
        rows = []
        wall, gib, codes = timed_ranks(2, base, work / "save.log")
        assert codes == [0, 0], (work / "save.log").read_text()[-3000:]
        tag_dir = next((work / "runs/w24/checkpoints").glob("step*"))
        size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file()) / 2**30
        rows.append(("build, 1 step, save (2 ranks, ZeRO-2 bf16)", wall, gib))
        proc = subprocess.run(["/usr/bin/time", "-f", "RSS_KB=%M WALL_S=%e", sys.executable, "-m",
                               "cvtkit.train.reshard", str(work / "runs/w24")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = _TIME.search(proc.stderr)
        rows.append(("convert: python -m cvtkit.train.reshard", float(found.group(2)), int(found.group(1)) / 2**20))
        for nproc in (1, 4):  # schedule.steps=1: the resumed run loads the checkpoint and is complete
            wall, gib, codes = timed_ranks(nproc, base, work / f"resume{nproc}.log")
            assert codes == [0] * nproc, (work / f"resume{nproc}.log").read_text()[-3000:]
            rows.append((f"resume on {nproc} rank{'s' if nproc > 1 else ''} (load the universal checkpoint)", wall, gib))
        from cvtkit.models.summary import param_count
        print(f"CvT-W24, 4-class head ({param_count('cvt_w24', num_classes=4):,} parameters); "
              f"ZeRO-2 checkpoint {size:.2f} GiB ({tag_dir.name})\n")
        print("| phase | wall s | peak GiB (largest rank) |\n|---|---|---|")
        for name, seconds, peak in rows:
            print(f"| {name} | {seconds:.1f} | {peak:.2f} |")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
