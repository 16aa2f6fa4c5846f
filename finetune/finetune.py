"""Fine-tune pretrained weights: `python finetune/finetune.py --config configs/finetune/<recipe>.yaml
--pretrained PATH [--set key=value ...]` (also the console script `cvtkit-finetune`).

PATH (`init.pretrained`) is a pretraining run folder or one of its checkpoints (any ZeRO stage), an
export, or an official CvT/CeiT or HuggingFace checkpoint. The 22k head becomes the data's head by
synset (`init.head`), CvT's weights run unchanged at 384, CeiT's position embedding is resized. The
rest is the pretraining engine: the same command runs as one process, under torchrun or deepspeed,
and as the tasks of `srun` (slurm/finetune_w24_384.sh); it resumes from the run folder, exits 75
after saving on SIGUSR1/SIGTERM (requeue), 2 on bad input, 1 on a failure.
"""
import sys

from cvtkit.train.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
