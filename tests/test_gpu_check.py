"""`make gpu-check`'s own logic on CPU (`--dry-run`): a part that runs out of its time does not stop
the others, and the summary says which. The whole dry run, demo included, is in test_demo.py."""
import subprocess
import sys

from helpers import REPO


def test_a_part_out_of_time_is_reported_and_the_next_part_still_runs(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(tmp_path),
                           "--parts", "tests", "bench", "--budget-s", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | TIMEOUT |" in summary and "| bench | ok |" in summary
    assert (tmp_path / "tests.log").is_file() and (tmp_path / "bench.md").is_file()
