"""What a training rank loads when it starts: every test and every requeue starts ranks, so an
import the run does not need is kept out (timm, about 0.5 s a rank: the models bring their own
DropPath, and the augmentations import it when a recipe uses them)."""
import json
import os
import subprocess
import sys

from helpers import REPO, make_tiny_shards, train_argv

PROBE = """
import json, pathlib, runpy, sys
report, sys.argv = sys.argv[1], sys.argv[2:]
code = 0  # the entry returned without sys.exit
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
pathlib.Path(report).write_text(json.dumps({"exit": code, "timm": "timm" in sys.modules}))
"""


def test_a_training_rank_without_timms_augmentations_does_not_import_timm(tmp_path):
    shards = make_tiny_shards(tmp_path / "data")
    argv = [str(REPO / "pretrain" / "train.py"), *train_argv(tmp_path / "runs", shards, ["schedule.epochs=1"])]
    report = tmp_path / "loaded.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(report), *argv], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and report.is_file(), proc.stdout + proc.stderr
    loaded = json.loads(report.read_text())
    assert loaded == {"exit": 0, "timm": False}
