"""Export a run or checkpoint: `python finetune/export.py RUN_OR_CHECKPOINT OUT [--ema]` (also the
console script `cvtkit-export`).

Writes OUT/model.safetensors and OUT/cvtkit.json (model, classes, evaluation metadata), which
`cvtkit.models.load_pretrained` and `model_from_export` read.
"""
import sys

from cvtkit.eval.export import main

if __name__ == "__main__":
    sys.exit(main())
