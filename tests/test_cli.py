"""The entry points' error handling: a user's mistake is one line, a bug keeps its traceback."""
import subprocess
import sys
import textwrap
from pathlib import Path

from cvtkit.train.cli import pretrain_main

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


def test_a_bad_config_is_one_line_and_exit_2(capsys):
    code = pretrain_main(["--config", str(TINY_CONFIG), "--set", "optim.lr=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: --set: optim.lr: expected a positive learning rate, got -1.0"]


def test_a_missing_shard_folder_is_one_line_and_exit_2(tmp_path, capsys):
    code = pretrain_main(["--config", str(TINY_CONFIG), "--set", f"data.train={tmp_path / 'none'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: data.train: {tmp_path / 'none'}: no such shard folder"


def test_an_internal_key_error_keeps_its_traceback():
    """A KeyError raised by a bug inside the trainer is not bad input: it must not be turned into
    `error: ...`; it propagates with its traceback and a non-zero exit."""
    program = textwrap.dedent(f"""
        import sys
        from cvtkit.train import trainer

        def setup_with_a_bug(self):
            return {{}}["planted"]

        trainer.Trainer.setup = setup_with_a_bug
        from cvtkit.train.cli import pretrain_main
        sys.exit(pretrain_main(["--config", {str(TINY_CONFIG)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "in setup_with_a_bug" in proc.stderr and "KeyError: 'planted'" in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())
