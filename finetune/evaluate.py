"""Evaluate a checkpoint: `python finetune/evaluate.py --checkpoint PATH --data PATH [--res 384]`
(also the console script `cvtkit-evaluate`).

PATH: a run folder or checkpoint (any ZeRO stage), an export, an official CvT/CeiT or HuggingFace
file (`--model NAME` for those); data: webdataset shards, a `.beton` file or an image folder.
Top-1 / top-5 and loss with the official evaluation transform (docs/evaluation.md), in fp32. One
process, or many under torchrun / srun (each rank evaluates its share; the sums are all-reduced).
"""
import sys

from cvtkit.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
