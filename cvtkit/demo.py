"""`make demo`: the whole pipeline on built-in data, on CPU, in a few minutes.

scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) become JPEGs at 32x32:
1. a "22k-like" source (all 10 digits, one folder per synset) and a "1k-like" subset (6 digits) with
   its own train and validation images, none of which pretraining sees;
2. `data_prep/make_shards.py` shards both (and `data_prep/make_ffcv.py` writes the subset's .beton,
   where ffcv is installed; elsewhere the demo says so and goes on);
3. `pretrain/train.py` trains a small CvT with DeepSpeed ZeRO-2 over two local processes,
   stopped halfway (`checkpoint.stop_at_step`) and resumed from its checkpoint;
4. `finetune/finetune.py` moves it to the subset at 48x48: the head rows of the same synsets are
   copied, nothing is interpolated;
5. `finetune/evaluate.py` measures top-1 on the subset's held-out images; a summary and a plot
   (`demo_out/runs/curves.png`) close the run.
Every figure printed is measured in this run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cvtkit.dist import launch_local
from cvtkit.shards import INFO_FILE

REPO = Path(__file__).resolve().parents[1]
SYNSETS = [f"n{9000000 + d:08d}" for d in range(10)]  # one made-up synset per digit
SUBSET = [0, 1, 2, 3, 4, 5]  # the "1k" classes


def render(image8x8: np.ndarray, size: int = 32):
    from PIL import Image
    pixels = (image8x8 / 16.0 * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")


def build_sources(root: Path) -> tuple[Path, Path]:
    """Per digit: 55% of its images to the 22k-like tree, 25% to the subset's train, 20% to its
    validation (held out from both trainings)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(0)
    src22k, src1k = root / "in22k_like", root / "in1k_like"
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == d))
        cut1, cut2 = int(0.55 * len(idx)), int(0.80 * len(idx))
        parts = [(src22k / SYNSETS[d], idx[:cut1])]
        if d in SUBSET:
            parts += [(src1k / "train" / SYNSETS[d], idx[cut1:cut2]), (src1k / "val" / SYNSETS[d], idx[cut2:])]
        for folder, ids in parts:
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                render(digits.images[i]).save(folder / f"{SYNSETS[d]}_{i}.JPEG", quality=95)
    return src22k, src1k


def sh(cmd: list, log: Path, env: dict | None = None, ok=(0,), nproc: int = 0) -> int:
    """Run a step (`nproc` ranks of it when > 0, launched as srun or torchrun would), its output
    to `log`, rank 0's progress lines also to the terminal."""
    cmd = [str(c) for c in cmd]
    print("  $ " + ("" if not nproc else f"[{nproc} ranks] ") + " ".join(cmd), flush=True)
    full_env = {**os.environ, **(env or {})}
    with open(log, "a") as f:
        if nproc:
            procs = launch_local(nproc, cmd, full_env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        else:
            procs = [subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)]
        for line in procs[0].stdout:
            f.write(line)
            if line.startswith(("[cvtkit]", "error", "top-1", "Traceback")):
                print("    " + line.rstrip(), flush=True)
        for q in procs[1:]:
            f.write(q.communicate()[0])
        codes = [q.wait() for q in procs]
    if any(c not in ok for c in codes):
        raise SystemExit(f"demo: step failed with exit codes {codes}; see {log}")
    return codes[0]


def plot(pre: list[dict], ft: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, records in (("pretrain (22k-like, 32px)", pre), ("fine-tune (1k-like, 48px)", ft)):
        steps = [r["step"] for r in records if "train/loss" in r]
        axes[0].plot(steps, [r["train/loss"] for r in records if "train/loss" in r], label=name)
        val = [(r["step"], r["val/top1"]) for r in records if "val/top1" in r]
        if val:
            axes[1].plot(*zip(*val), marker="o", label=name)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="validation top-1 (%)", xlabel="step", ylim=(0, 100))
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "demo.log"
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    timings = {}

    print("1/5 building the sources from scikit-learn's digits", flush=True)
    src22k, src1k = build_sources(out / "sources")
    timings["sources"] = time.time() - t0

    print("2/5 sharding (webdataset) and the subset's ffcv file", flush=True)
    t = time.time()
    shards22k, shards1k = out / "shards/in22k_like", out / "shards/in1k_like"
    sh([sys.executable, "data_prep/make_shards.py", "--source", src22k, "--out", shards22k, "--prefix", "in22k",
        "--holdout", "10", "--shard-samples", "200", "--workers", "2", "--quiet"], log)
    sh([sys.executable, "data_prep/make_shards.py", "--source", src1k, "--out", shards1k, "--prefix", "in1k",
        "--shard-samples", "200", "--workers", "2", "--quiet"], log)
    if importlib.util.find_spec("ffcv") is None:  # e.g. a bare GPU machine: ffcv does not travel
        print("  ffcv step: not installed here (not measured)", flush=True)
    else:
        sh([sys.executable, "data_prep/make_ffcv.py", "--shards", shards1k, "--out", out / "shards/in1k_like_ffcv",
            "--max-resolution", "48", "--workers", "2"], log)
    timings["shards"] = time.time() - t

    print("3/5 pretraining: DeepSpeed ZeRO-2 bf16, 2 processes, stopped halfway and resumed", flush=True)
    t = time.time()
    pre_cfg = REPO / "configs/pretrain/demo_digits.yaml"
    pre_set = ["--set", f"data.train={shards22k}", f"data.val={shards22k}", f"out_dir={out}/runs"]
    info = json.loads((shards22k / INFO_FILE).read_text())
    import yaml  # the stop step: half the schedule, read from the recipe
    recipe = yaml.safe_load(pre_cfg.read_text())
    per_epoch = info["splits"]["train"]["num_samples"] // recipe["data"]["batch_size"]
    total = int(recipe["schedule"]["epochs"] * per_epoch)
    sh([sys.executable, "pretrain/train.py", "--config", pre_cfg, *pre_set, f"checkpoint.stop_at_step={total // 2}"],
       log, env, ok=(75,), nproc=args.nproc)
    sh([sys.executable, "pretrain/train.py", "--config", pre_cfg, *pre_set], log, env, nproc=args.nproc)
    timings["pretrain"] = time.time() - t

    print("4/5 fine-tuning at 48x48 on the subset, head rows mapped by synset", flush=True)
    t = time.time()
    pre_run = out / "runs" / recipe["name"]
    ft_cfg = REPO / "configs/finetune/demo_digits.yaml"
    sh([sys.executable, "finetune/finetune.py", "--config", ft_cfg, "--pretrained", pre_run, "--set",
        f"data.train={shards1k}", f"data.val={shards1k}", f"out_dir={out}/runs"], log, env, nproc=args.nproc)
    timings["finetune"] = time.time() - t

    print("5/5 evaluating on the subset's held-out images", flush=True)
    t = time.time()
    ft_name = yaml.safe_load(ft_cfg.read_text())["name"]
    ft_run = out / "runs" / ft_name
    result = out / "eval.json"
    sh([sys.executable, "finetune/evaluate.py", "--checkpoint", ft_run, "--data", shards1k, "--res", "48",
        "--json", result], log, env)
    timings["evaluate"] = time.time() - t

    return summarize(out, pre_run, ft_run, result, timings, t0, args.nproc)


def summarize(out: Path, pre_run: Path, ft_run: Path, result: Path, timings: dict, t0: float, nproc: int) -> int:
    """The plot and the summary, every figure read from the runs; 0 when fine-tuning reached 95%."""
    from cvtkit.train.metrics import read_metrics
    pre, ft = read_metrics(pre_run), read_metrics(ft_run)
    plot(pre, ft, out / "runs/curves.png")
    final = json.loads(result.read_text())
    pre_val = [r for r in pre if "val/top1" in r][-1]
    speed = [r["perf/images_per_s"] for r in pre if "perf/images_per_s" in r]
    starts = [json.loads(line) for line in (pre_run / "starts.jsonl").read_text().splitlines()]
    print("\nsummary (measured in this run)")
    print(f"  pretraining  : {pre_val['step']} steps, resumed at step {starts[-1]['step']}; "
          f"val top-1 {pre_val['val/top1']:.1f}% on {int(pre_val['val/count'])} held-out images of 10 classes")
    print(f"  fine-tuning  : val top-1 {final['top1']:.1f}% / top-5 {final['top5']:.1f}% on "
          f"{int(final['count'])} held-out images of {len(SUBSET)} classes, at 48x48")
    print(f"  throughput   : pretraining {np.median(speed):.0f} images/s (median, {nproc} CPU processes)")
    print("  time         : " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) +
          f"; total {time.time() - t0:.0f}s")
    print(f"  tensorboard  : tensorboard --logdir {out / 'runs'}")
    print(f"  plot         : {out / 'runs/curves.png'}")
    print(f"  log          : {out / 'demo.log'}")
    return 0 if final["top1"] >= 95 else 1

if __name__ == "__main__":
    sys.exit(main())
