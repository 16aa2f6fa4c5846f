"""`make gpu-check`'s own logic on CPU: without CUDA it refuses at once; it passes nothing that did
not run on the GPU (a skipped GPU test, a demo trained elsewhere, a benchmark row that failed); a
part out of its time does not stop the others. The whole dry run, demo included, is in
test_demo.py; the offline install of its wheels in test_gpu_wheels.py."""
import os
import subprocess
import sys

from helpers import REPO, tool


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_without_cuda_it_refuses_at_once(tmp_path):
    proc = run("--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: CUDA is unavailable here (torch ") and proc.stderr.count("\n") == 1
    assert "--dry-run checks the script on CPU" in proc.stderr
    assert not (tmp_path / "out").exists()  # no part started


def test_wheels_folder_without_wheels_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run("--dry-run", "--wheels", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == f"error: --wheels {tmp_path / 'empty'}: no .whl files there (make gpu-wheels writes them)\n"


def counts(tests: int, skipped: int = 0, failures: int = 0) -> dict:
    return {"tests": tests, "failures": failures, "errors": 0, "skipped": skipped}


def test_gpu_tests_pass_only_when_every_one_ran_and_passed():
    g = tool("gpu_check")
    assert g.tests_status(0, counts(14), dry_run=False) == ("ok", True)
    # what a GPU machine whose CUDA does not start gives: pytest exits 0 with every test skipped
    assert g.tests_status(0, counts(14, skipped=14), dry_run=False) == (
        "FAILED (exit 0: 0 of 14 GPU tests passed, 0 failed, 14 skipped)", False)
    assert g.tests_status(0, counts(14, skipped=1), dry_run=False)[1] is False
    assert g.tests_status(5, counts(0), dry_run=False) == ("FAILED (exit 5: no GPU test ran)", False)
    assert g.tests_status(1, counts(14, failures=2), dry_run=False)[1] is False
    assert g.tests_status(None, counts(0), dry_run=False) == ("TIMEOUT", False)
    # on CPU the honest outcome is the other way round: all collected, all skipped
    assert g.tests_status(0, counts(14, skipped=14), dry_run=True) == (
        "not run: CPU dry run, all 14 GPU tests skipped", True)
    assert g.tests_status(0, counts(14, skipped=13), dry_run=True)[1] is False
    assert g.tests_status(5, counts(0), dry_run=True)[1] is False


def test_the_demo_passes_only_when_it_trained_on_the_expected_device():
    g = tool("gpu_check")
    gpu, cpu = {"device": "cuda:0"}, {"device": "cpu"}
    assert g.demo_status(0, [gpu, gpu, gpu], "cuda", dry_run=False) == ("ok", True)
    assert g.demo_status(0, [gpu, cpu, gpu], "cuda", dry_run=False) == ("FAILED (trained on cpu, not cuda)", False)
    assert g.demo_status(0, [], "cuda", dry_run=False) == ("FAILED (trained on nothing, not cuda)", False)
    assert g.demo_status(1, [gpu], "cuda", dry_run=False) == ("FAILED (exit 1)", False)
    assert g.demo_status(0, [cpu, cpu], "cpu", dry_run=True) == ("ok: CPU dry run", True)


def test_benchmark_rows_an_error_fails_an_oom_is_a_finding(tmp_path):
    g = tool("gpu_check")
    for part in ("bench", "kernels"):
        (tmp_path / f"{part}.log").write_text("| row | images/s |\n|---|---|\n| a | 10 |\n")
    ok, oom, error = ({"spec": "a", "status": "ok"}, {"spec": "b", "status": "OOM"},
                      {"spec": "c", "status": "error: RuntimeError: boom"})
    outcome = g.table_outcome("bench", tmp_path, 0, 1.0, {"rows": [ok, oom], "not_measured": []}, cut_ok=False)
    assert (outcome.status, outcome.passed) == ("ok", True)
    assert outcome.figures == ["1 rows measured (bench.md)", "OOM (a finding, not a measurement): b"]
    assert (tmp_path / "bench.md").read_text().count("\n") == 3
    outcome = g.table_outcome("bench", tmp_path, 1, 1.0, {"rows": [ok, error], "not_measured": []}, cut_ok=False)
    assert (outcome.status, outcome.passed) == ("FAILED (1 row(s) failed)", False)
    # cut by the deadline: the aims' table is then incomplete; the kernel table may be cut
    cut = {"rows": [ok], "not_measured": ["d"]}
    outcome = g.table_outcome("bench", tmp_path, None, 1.0, cut, cut_ok=False)
    assert (outcome.status, outcome.passed) == ("TIMEOUT (1 row(s) not measured)", False)
    outcome = g.table_outcome("kernels", tmp_path, None, 1.0, cut, cut_ok=True)
    assert outcome.passed and outcome.status == "ok (cut at its deadline: 1 row(s) not measured)"
    assert outcome.not_measured == ["kernels row d: cut at the part's deadline"]
    outcome = g.table_outcome("kernels", tmp_path, None, 1.0, {"rows": [], "not_measured": []}, cut_ok=True)
    assert (outcome.status, outcome.passed) == ("TIMEOUT (no row measured)", False)


def test_a_part_out_of_time_is_reported_and_the_next_part_still_runs(tmp_path):
    proc = run("--dry-run", "--out", str(tmp_path), "--parts", "tests", "kernels", "--budget-s", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | TIMEOUT |" in summary and "| kernels | ok |" in summary
    assert (tmp_path / "tests.log").is_file() and (tmp_path / "kernels.md").is_file()
    assert "## not measured (never counted as passed)" in summary and "DALI does not travel" in summary
