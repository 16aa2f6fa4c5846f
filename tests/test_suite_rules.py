"""The suite's own rule for tests that need root or a local Slurm: skip elsewhere, fail in CI."""
import pytest

from helpers import cannot_run


def test_cannot_run_skips_with_the_reason(monkeypatch):
    monkeypatch.delenv("CVTKIT_NO_SKIP", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        cannot_run("needs root")


def test_cannot_run_fails_where_everything_must_run(monkeypatch):
    monkeypatch.setenv("CVTKIT_NO_SKIP", "1")  # what .ci/run sets
    with pytest.raises(pytest.fail.Exception, match="needs root.*must run here"):
        cannot_run("needs root")
