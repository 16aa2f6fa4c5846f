"""`make demo`'s job end to end: real shards, DeepSpeed over two processes with a stop and a
resume, fine-tuning at a higher resolution, evaluation, at least 95% top-1 on held-out digits."""
import json
import subprocess
import sys

import pytest

from train_helpers import REPO


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cvtkit.demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at step 104" in proc.stdout
    assert "6/6 head rows copied by synset" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["top1"] >= 95 and result["count"] == 220
    assert (out / "runs/curves.png").stat().st_size > 10_000
    assert list((out / "runs/demo_pretrain/tensorboard").iterdir())
    assert (out / "shards/in1k_like_ffcv/train.beton").is_file()
