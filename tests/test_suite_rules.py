"""The suite's own rules: tests that need root or a local Slurm skip elsewhere and fail in CI; under
`make test`'s two xdist workers the Slurm tests share one worker."""
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, cannot_run


def test_cannot_run_skips_with_the_reason(monkeypatch):
    monkeypatch.delenv("CVTKIT_NO_SKIP", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        cannot_run("needs root")


def test_cannot_run_fails_where_everything_must_run(monkeypatch):
    monkeypatch.setenv("CVTKIT_NO_SKIP", "1")  # what .ci/run sets
    with pytest.raises(pytest.fail.Exception, match="needs root.*must run here"):
        cannot_run("needs root")


def test_the_slurm_tests_come_first_in_one_xdist_group():
    """tests/conftest.py: what `make test`'s two workers rely on. The tests that use the one local
    Slurm form one xdist group (one worker runs them in order), ahead of the rest; no other test is
    in a group."""
    class Collected:
        def pytest_collection_finish(self, session):
            self.items = [(item.name, [m.args for m in item.iter_markers("xdist_group")]) for item in session.items]

    collected = Collected()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_suite_rules.py"),
                        str(REPO / "tests" / "test_dist.py")], plugins=[collected])
    assert code == 0
    names, groups = zip(*collected.items)
    assert names[0] == "test_under_real_srun" and groups[0] == [("slurm",)], collected.items
    assert "test_cannot_run_skips_with_the_reason" in names and not any(groups[1:]), collected.items



SPREAD_CONFTEST = """
import importlib.util
import pytest
spec = importlib.util.spec_from_file_location("suite_conftest", {conftest!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_collection_modifyitems = suite.pytest_collection_modifyitems

@pytest.fixture
def slurm_cluster():
    yield
"""

SPREAD_TESTS = """
import os, pathlib, pytest

def record(name):
    pathlib.Path(os.environ["WORKERS_OUT"], name).write_text(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(20))
def test_plain(i):
    record(f"plain{i}")

@pytest.mark.parametrize("i", range(6))
def test_on_slurm(slurm_cluster, i):
    record(f"slurm{i}")
"""


def make_test_xdist_options() -> list[str]:
    """The xdist options of the Makefile's `test` recipe (`-n N --dist MODE`)."""
    recipe = re.search(r"^test:.*\n\t(.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    found = re.search(r"-n (\d+) --dist (\w+)", recipe)
    assert found, f"no xdist options in make test's recipe: {recipe}"
    return ["-n", found[1], "--dist", found[2]]


def test_two_workers_run_every_slurm_test_on_the_same_one(tmp_path):
    """`make test`'s own xdist options over a suite of plain tests and tests of the
    `slurm_cluster` fixture, with tests/conftest.py's hook: every Slurm test runs on one worker."""
    suite, out = tmp_path / "suite", tmp_path / "workers"
    suite.mkdir(), out.mkdir()
    (suite / "conftest.py").write_text(SPREAD_CONFTEST.format(conftest=str(REPO / "tests" / "conftest.py")))
    (suite / "test_spread.py").write_text(SPREAD_TESTS)
    env = {**os.environ, "WORKERS_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *make_test_xdist_options(),
                           str(suite)], cwd=suite, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    workers = {p.name: p.read_text() for p in out.iterdir()}
    assert len(workers) == 26 and set(workers.values()) == {"gw0", "gw1"}, workers
    assert len({w for name, w in workers.items() if name.startswith("slurm")}) == 1, workers
