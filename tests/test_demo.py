"""`make demo`'s job end to end (real shards, DeepSpeed over two processes with a stop and a resume,
fine-tuning at a higher resolution, evaluation, at least 95% top-1 on held-out digits), run as the
demo part of `make gpu-check --dry-run`: one run checks both, and the GPU check's own logic (its
parts, logs, table and summary) on CPU."""
import json
import re
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_demo_end_to_end_and_the_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out),
                           "--budget-s", "3600"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout
    # The honest CPU statuses: every GPU test collected and skipped (not "ok"), the demo trained on
    # the CPU (its runs' starts.jsonl), the benchmarks ran their tiny rows.
    tests = re.search(r"\| tests \| not run: CPU dry run, all (\d+) GPU tests skipped \|", summary)
    assert tests and int(tests.group(1)) >= 10, summary
    assert "| demo | ok: CPU dry run |" in summary and "| bench | ok |" in summary and "| kernels | ok |" in summary
    assert f"0 of {tests.group(1)} GPU tests passed, 0 failed, {tests.group(1)} skipped" in summary
    assert "skipped: CUDA is absent" in summary and "3 training starts, on cpu" in summary
    assert "pretraining  :" in summary and "fine-tuning  :" in summary
    assert "## not measured (never counted as passed)" in summary and "DALI does not travel" in summary

    demo_log = (out / "demo.log").read_text()
    assert "resumed at step 104" in demo_log and "6/6 head rows copied by synset" in demo_log
    demo = out / "demo"
    result = json.loads((demo / "eval.json").read_text())
    assert result["top1"] >= 95 and result["count"] == 220
    assert (demo / "runs/curves.png").stat().st_size > 10_000
    assert list((demo / "runs/demo_pretrain/tensorboard").iterdir())
    assert (demo / "shards/in1k_like_ffcv/train.beton").is_file()

    bench = (out / "bench.md").read_text().splitlines()
    assert len(bench) == 3 and bench[2].startswith("| pretrain/tiny_cpu | cvt_13 @ 32 | 16 x 1 |")
    kernels = (out / "kernels.md").read_text().splitlines()
    assert len(kernels) == 4 and "cvt_13@32:b4:ref" in kernels[2] and "cvt_13@32:b4:sdpa" in kernels[3]
    assert json.loads((out / "environment.json").read_text())["dry run"] == "CPU"
