"""Fine-tune pretrained weights: `python finetune/finetune.py --config configs/finetune/<recipe>.yaml
--pretrained PATH [--set key=value ...]`.

PATH is a pretraining run folder or one of its checkpoints (any ZeRO stage), an export, or an
official CvT/CeiT or HuggingFace checkpoint. The 22k head becomes the data's head by synset
(`init.head`), CvT's weights run unchanged at 384, CeiT's position embedding is resized. The rest
is the pretraining engine: the same command runs as one process, under torchrun or deepspeed,
and as the tasks of `srun` (slurm/finetune_w24_384.sh); it resumes from the run folder, exits 75
after saving on SIGUSR1/SIGTERM (requeue), 2 on bad input, 1 on a failure.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from cvtkit.finetune.pretrained import add_args, adjust  # noqa: E402
from cvtkit.train.cli import run_training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_training(argv, description=__doc__, extra_args=add_args, adjust=adjust)


if __name__ == "__main__":
    sys.exit(main())
