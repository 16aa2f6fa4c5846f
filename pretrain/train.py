"""Pretrain a model from shards: `python pretrain/train.py --config configs/pretrain/<recipe>.yaml
[--set key=value ...]` (also the console script `cvtkit-pretrain`). The same command runs as one
process, under torchrun or deepspeed, and as the tasks of `srun` (see slurm/pretrain_w24.sh); it
resumes from the run folder's latest checkpoint."""
import sys

from cvtkit.train.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
