"""Pretrain a model from shards: `python pretrain/train.py --config configs/pretrain/<recipe>.yaml
[--set key=value ...]`. The same command runs as one process, under torchrun or deepspeed, and as
the tasks of `srun` (see slurm/pretrain_w24.sh); it resumes from the run folder's latest checkpoint."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from cvtkit.train.cli import run_training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_training(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
