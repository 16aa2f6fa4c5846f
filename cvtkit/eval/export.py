"""Export a run or any checkpoint: `model.safetensors` (official names) plus `cvtkit.json` with
the model name and options, the classes (index, synset, name) and the evaluation metadata,
loadable with `cvtkit.models.load_pretrained` / `model_from_export`.

    python finetune/export.py runs/cvt_w24_384_ft1k exports/cvt_w24_384_ft1k
    python finetune/export.py runs/ceit_small_384_ft1k/checkpoints/step00075000 out --ema
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn as nn

from cvtkit.errors import CvtkitError
from cvtkit.shards import class_records
from cvtkit.models.factory import eval_config
from cvtkit.models.weights import checkpoint_classes, model_from_checkpoint, save_export

from .evaluate import trained_res


def export(source: str, out: str, model_name: str | None = None, use_ema: bool = False) -> tuple[nn.Module, dict]:
    """Write the export; returns the model and the metadata written beside it."""
    model, ckpt = model_from_checkpoint(source, model_name, use_ema)
    classes = ckpt.metadata.get("classes") if ckpt.source_format == "export" else None
    synsets = checkpoint_classes(ckpt)
    if classes is None and synsets is not None:
        classes = class_records(synsets)
    res = trained_res(ckpt)
    if res is not None:  # the size it was trained / fine-tuned for, e.g. a CvT at 384
        model.eval_cfgs.setdefault(res, eval_config(model, res))
    extra = {"res": res, "source": str(ckpt.path), "source_format": ckpt.source_format,
             "step": ckpt.metadata.get("step"), "use_ema": use_ema}
    save_export(model, out, classes, extra)
    return model, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run folder or checkpoint (any ZeRO stage), export, official or HF file")
    parser.add_argument("out", help="output folder (model.safetensors + cvtkit.json)")
    parser.add_argument("--model", help="model name, for checkpoints that do not record it")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)
    try:
        model, extra = export(args.source, args.out, args.model, args.ema)
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        return e.exit_code
    print(f"{extra['source']} [{extra['source_format']}] -> {Path(args.out)}: {model.model_name}, "
          f"{model.num_classes} classes, eval at {sorted(model.eval_cfgs)}", flush=True)
    return 0
