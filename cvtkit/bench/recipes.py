"""The training step as users run it: the real `Trainer` from a recipe (DeepSpeed ZeRO in the
recipe's precision, its micro batch, augmentation on the device, EMA, logging) on synthetic batches
held in memory, one process on one GPU. The figures are the Trainer's own, from its
`metrics.jsonl`: `perf/images_per_s`, `perf/step_s`, `perf/mfu`, `mem/peak_gib`. The aims in
BENCHMARKS.md are read off these rows; `cvtkit.bench.train` has the kernel-level rows (plain
PyTorch, one option at a time).

    python -m cvtkit.bench.recipes                      # the default rows (GPU_ROWS, or CPU_ROWS)
    python -m cvtkit.bench.recipes --rows pretrain/cvt_13_224_in1k \\
        "pretrain/cvt_13_224_in1k model.attn_impl=reference" --steps 10

A row is `RECIPE [KEY=VALUE ...]`: a recipe under configs/ (without .yaml) or a YAML file, then
`--set` overrides. Each row runs in a process of its own (a fresh GPU; an OOM ends only its row)
with `data.batch_size` = the recipe's `engine.micro_batch` x `--accumulation` (default 1: one
optimizer step per micro-batch, as on the recipes' stated hardware). It trains 2 x `--steps`
steps, logging every `--steps`: the first window (compilation, autotuning, the allocator's
growth) is the warm-up, whose seconds per step the table also gives; the row is the second
window. No checkpoint is saved and no validation runs. "x ref" is images/s over the row of the
same model, resolution and micro batch with `model.attn_impl=reference`. A row that runs out of
memory is OOM, a finding, not a measurement; a row that fails otherwise is an error, which makes
the command exit 1.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]

# Most important first (the aims), so that a deadline cuts the variants: CvT-13 against the
# official einsum attention in the same trainer (>= 1.5x), CvT-W24 at 224 (>= 35% MFU), CvT-W24
# at 384 with micro batch 64 (fits 80 GB); then compile and channels-last, which no recipe sets yet.
GPU_ROWS = [
    "pretrain/cvt_13_224_in1k",
    "pretrain/cvt_13_224_in1k model.attn_impl=reference",
    "pretrain/cvt_w24_224_in22k",
    "finetune/cvt_w24_384_ft1k engine.micro_batch=64",
    "pretrain/cvt_13_224_in1k engine.channels_last=true engine.compile=true",
    "pretrain/cvt_w24_224_in22k engine.channels_last=true engine.compile=true",
    "finetune/cvt_w24_384_ft1k engine.micro_batch=64 engine.channels_last=true engine.compile=true",
]
CPU_ROWS = ["pretrain/tiny_cpu"]
SYNTHETIC_BATCHES = 10 ** 6  # the loader's length: an epoch never ends within a benchmark


class SyntheticLoader:
    """The same uint8 batch `[B, 3, S, S]` and labels `[B]` over and over (pinned where there is a
    GPU), so that the loader costs nothing; what the Trainer asks of a loader."""

    def __init__(self, batch: int, res: int, num_classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, num_classes, (batch,), generator=g)
        if torch.cuda.is_available():
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self.damaged = 0

    def __len__(self) -> int:
        return SYNTHETIC_BATCHES

    def __iter__(self):
        for _ in range(SYNTHETIC_BATCHES):
            yield self.images, self.labels

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SyntheticData:
    """What `RunData.open` gives the Trainer, for synthetic batches: no shards, no class list."""
    train_info = val_info = synsets = num_classes = None

    def __init__(self, res: int, num_classes: int):
        self.res, self.classes = res, num_classes

    def train_loader(self, micro_batch: int, rank: int, world_size: int, seed: int) -> SyntheticLoader:
        return SyntheticLoader(micro_batch, self.res, self.classes, seed + rank)


def parse_row(spec: str) -> tuple[Path, list[str]]:
    """`RECIPE [KEY=VALUE ...]` -> (the recipe's path, overrides)."""
    recipe, *overrides = shlex.split(spec)
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else REPO / "configs" / f"{recipe}.yaml"
    return path, overrides


def bench_overrides(path: Path, overrides: list[str], run_dir: Path, steps: int, accumulation: int) -> list[str]:
    """The row's overrides, then what makes it a benchmark of one rank on synthetic data."""
    from cvtkit.config_loader import load_config
    from cvtkit.train.run_config import RunConfig
    cfg = load_config(RunConfig, path, overrides)
    micro = cfg.engine.micro_batch or cfg.data.batch_size
    return [*overrides, "name=bench", f"out_dir={run_dir}", f"engine.micro_batch={micro}",
            f"data.batch_size={micro * accumulation}", "data.val=null", "data.workers=0",
            "schedule.epochs=null", f"schedule.steps={2 * steps}", f"log.every_steps={steps}",
            "log.eval_every_steps=0", "log.progress=false", "checkpoint.resume=never", "init.pretrained=null"]


def run_one(spec: str, run_dir: Path, steps: int, accumulation: int) -> int:
    """One row, in this process: the real Trainer, minus saving."""
    from cvtkit.config_loader import load_config
    from cvtkit.errors import CvtkitError
    from cvtkit.train.cli import quiet_libraries
    from cvtkit.train.run_config import RunConfig
    from cvtkit.train.trainer import Trainer

    class BenchTrainer(Trainer):
        def _should_save(self, stop: bool) -> bool:
            return False  # a benchmark leaves no checkpoint (W24's is 3.6 GB)

    quiet_libraries()
    path, overrides = parse_row(spec)
    try:
        cfg = load_config(RunConfig, path, bench_overrides(path, overrides, run_dir, steps, accumulation))
        return BenchTrainer(cfg, data=SyntheticData(cfg.data.res, cfg.model.num_classes)).fit()
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        return e.exit_code


@dataclass
class Row:
    spec: str
    status: str = "ok"  # ok, OOM, error: ...
    windows: list[dict] = field(default_factory=list)  # the Trainer's records with perf/ figures
    config: dict = field(default_factory=dict)  # the Trainer's resolved config.yaml
    start: dict = field(default_factory=dict)  # its starts.jsonl record

    @property
    def figures(self) -> dict:
        return self.windows[-1]


def failure(output: str) -> str:
    """A failed row's status from its output: OOM (a finding), else its last line."""
    if "out of memory" in output.lower():
        return "OOM"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return f"error: {(lines or ['no output'])[-1].removeprefix('error: ')[:160]}"


def measure(spec: str, work: Path, steps: int, accumulation: int) -> Row:
    run_dir = work / f"row{len(list(work.iterdir()))}"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "cvtkit.bench.recipes", "--one", spec, "--run-dir", str(run_dir),
           "--steps", str(steps), "--accumulation", str(accumulation)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (run_dir / "output.log").write_text(proc.stdout + proc.stderr)
    row = Row(spec)
    if proc.returncode != 0:
        row.status = failure(proc.stdout + proc.stderr)
        if row.status != "OOM":
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr, flush=True)
        return row
    run = run_dir / "bench"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row.windows = [r for r in records if "perf/images_per_s" in r]
    row.config = yaml.safe_load((run / "config.yaml").read_text())
    row.start = json.loads((run / "starts.jsonl").read_text().splitlines()[-1])
    if [w["step"] for w in row.windows] != [steps, 2 * steps]:
        row.status = f"error: the Trainer logged steps {[w['step'] for w in row.windows]}, not {steps} and {2 * steps}"
    return row


def _reference(rows: list[Row], row: Row) -> Row | None:
    def key(r):
        return r.config["model"]["name"], r.config["data"]["res"], r.config["engine"]["micro_batch"]
    return next((r for r in rows if r.status == "ok" and key(r) == key(row)
                 and r.config["model"]["attn_impl"] == "reference"), None)


def format_table(rows: list[Row]) -> str:
    head = ("| row | model @ res | micro x accum | images/s | s/step | MFU | peak GiB | data wait "
            "| warm-up s/step | x ref |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        if row.status != "ok":
            lines.append(f"| {row.spec} | | | {row.status} | | | | | | |")
            continue
        c, f = row.config, row.figures
        accum = c["data"]["batch_size"] // c["engine"]["micro_batch"]
        mfu = f"{100 * f['perf/mfu']:.1f}%" if "perf/mfu" in f else "-"
        ref = _reference(rows, row)
        ratio = f"{f['perf/images_per_s'] / ref.figures['perf/images_per_s']:.2f}" if ref else "-"
        lines.append(f"| {row.spec} | {c['model']['name']} @ {c['data']['res']} | {c['engine']['micro_batch']} x "
                     f"{accum} | {f['perf/images_per_s']:,.1f} | {f['perf/step_s']:.3f} | {mfu} "
                     f"| {f['mem/peak_gib']:.2f} | {100 * f['perf/data_wait_fraction']:.1f}% "
                     f"| {row.windows[0]['perf/step_s']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cvtkit.bench.recipes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", help="RECIPE [KEY=VALUE ...] (default: GPU_ROWS on a GPU, else CPU_ROWS)")
    p.add_argument("--steps", type=int, help="steps per window (default 10 on a GPU, 3 on CPU)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON (status and the Trainer's figures)")
    p.add_argument("--keep", metavar="DIR", help="keep each row's run folder and output under DIR")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a row's own process
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    steps = args.steps or (10 if on_gpu else 3)
    if steps < 1 or args.accumulation < 1:
        p.error("--steps and --accumulation must be >= 1")
    if args.one:
        return run_one(args.one, Path(args.run_dir), steps, args.accumulation)
    specs = args.rows or (GPU_ROWS if on_gpu else CPU_ROWS)
    work = Path(args.keep or tempfile.mkdtemp(prefix="cvtkit-bench-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, interrupted = [], False
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(spec, work, steps, args.accumulation))
        except KeyboardInterrupt:  # e.g. `timeout -s INT`: print the rows measured so far
            interrupted = True
            break
        print(f"    {rows[-1].status}", file=sys.stderr, flush=True)
    device = next((r.start.get("device_name") or r.start.get("device") for r in rows if r.start), "-")
    print(f"device: {device}; torch {torch.__version__}; {steps} warm-up + {steps} measured steps per row, "
          f"accumulation {args.accumulation}, one process, synthetic batches in memory\n")
    print(format_table(rows))
    if interrupted:
        print(f"\ninterrupted: {len(specs) - len(rows)} row(s) not measured")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": [{"spec": r.spec, "status": r.status, **(r.figures if r.windows else {})} for r in rows],
             "not_measured": specs[len(rows):]}, indent=1) + "\n")
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 1 if interrupted or any(r.status.startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
