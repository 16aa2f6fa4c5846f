"""Export a run or checkpoint: `python finetune/export.py RUN_OR_CHECKPOINT OUT [--ema]`.

Writes OUT/model.safetensors and OUT/cvtkit.json (model, classes, evaluation metadata), which
`cvtkit.models.load_pretrained` and `model_from_export` read.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from cvtkit.finetune.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
