"""Starting a run from pretrained weights (`init.pretrained`, fine-tuning's starting point).

The trainer builds the model from the run config, then, on a fresh run (a resume skips this),
calls `load_pretrained_init(...)` before DeepSpeed wraps it:
1. rank 0 reads `init.pretrained` with `read_checkpoint` (a pretraining run folder or checkpoint
   of any ZeRO stage, consolidated by DeepSpeed's zero_to_fp32; an export; an official CvT/CeiT
   or HuggingFace file), takes the EMA weights with `init.use_ema`, turns the classifier into
   the fine-tuning data's (`init.head`: by synset, fresh or kept) and loads the result strictly.
   CvT's weights go in unchanged at any resolution (it has no position embedding); CeiT's
   `pos_embed` is resized bicubically (14x14 -> 24x24 for 224 -> 384);
2. the other ranks load what rank 0 staged in `<run>/init/`, so every rank starts from the
   same weights (fresh head rows included) and a checkpoint is consolidated once, not per rank.
`<run>/init.json` records the source and what was done to the head.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cvtkit.atomic import write_text_atomic
from cvtkit.shards import folder_synsets
from cvtkit.device import any_rank
from cvtkit.models.heads import HEAD_KEYS, describe_missing, map_head
from cvtkit.models.weights import (Checkpoint, CheckpointError, checkpoint_classes,
                                   load_state_dict_checked, read_checkpoint)

from .run_config import InitConfig

log = logging.getLogger("cvtkit.finetune")

# Official checkpoints do not list their classes; with these row counts they are the sorted
# synsets (fall11's 21,841, and ImageNet-1k's 1,000), as our shards are.
_STANDARD = {21841: "imagenet-22k", 1000: "imagenet-1k"}


def standard_classes(rows: int) -> list[str] | None:
    if rows not in _STANDARD:
        return None
    from timm.data import ImageNetInfo
    return list(ImageNetInfo(_STANDARD[rows]).label_names())


def pretrained_classes(ckpt: Checkpoint, init: InitConfig, rows: int) -> list[str] | None:
    classes = checkpoint_classes(ckpt)
    source = str(ckpt.path)
    if classes is None and init.classes_from:
        classes, source = folder_synsets(init.classes_from), init.classes_from
        if classes is None:
            raise FileNotFoundError(f"init.classes_from: {init.classes_from}: no _info.json with a class list")
    if classes is None and rows in _STANDARD:
        log.warning("%s does not list its classes; taking its %d rows as %s's sorted synsets "
                    "(set init.classes_from otherwise)", ckpt.path, rows, _STANDARD[rows])
        classes, source = standard_classes(rows), _STANDARD[rows]
    if classes is not None and len(classes) != rows:
        raise CheckpointError(f"{source} lists {len(classes)} classes but the pretrained head of "
                              f"{ckpt.path} has {rows} rows")
    return classes


def initial_state(model: nn.Module, init: InitConfig, dst_classes: list[str] | None
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read `init.pretrained`, map its head onto `model`'s classes, and load it into `model`
    strictly. Returns the loaded state and a record of what was done (for init.json)."""
    ckpt = read_checkpoint(init.pretrained, use_ema=init.use_ema)
    state = dict(ckpt.state_dict)
    fresh = model.state_dict()
    record = {"pretrained": init.pretrained, "read_from": str(ckpt.path), "source_format": ckpt.source_format,
              "step": ckpt.metadata.get("step"), "use_ema": init.use_ema, "head": init.head}
    head = init.head
    if head == "synset" and HEAD_KEYS[0] not in state:
        log.warning("%s has no classifier; the head starts fresh", ckpt.path)
        head = "fresh"
    if head == "synset":
        rows = state[HEAD_KEYS[0]].shape[0]
        src = pretrained_classes(ckpt, init, rows)
        if src is None:
            raise CheckpointError(f"{ckpt.path}: its head's {rows} rows list no classes; set "
                                  f"init.classes_from=<pretraining shards>, or init.head=fresh")
        if dst_classes is None:
            raise CheckpointError("init.head=synset needs the fine-tuning classes: data.train has no "
                                  "_info.json class list; use init.head=fresh")
        state, missing = map_head(state, src, dst_classes, fresh)
        record.update(copied=len(dst_classes) - len(missing), missing=missing)
        if missing:
            log.warning("%s", describe_missing(missing, len(dst_classes)))
    elif head == "fresh":
        state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
        state.update({k: fresh[k] for k in HEAD_KEYS if k in fresh})
    report = load_state_dict_checked(model, state, strict=True, source=str(ckpt.path))
    record["adapted"] = report.adapted
    return model.state_dict(), record


def load_pretrained_init(model: nn.Module, init: InitConfig, dst_classes: list[str] | None, run_dir: Path,
                         rank: int, world: int) -> None:
    """Load `init.pretrained` into `model` on every rank (see the module docstring); `dst_classes`:
    the synsets of the run's data. Errors are agreed across ranks, and raised on all of them."""
    staged = run_dir / "init" / "weights.safetensors"
    if dst_classes is None and model.num_classes == 1000:  # a 1k .beton without a class list
        dst_classes = standard_classes(1000)
    failure: Exception | None = None
    if rank == 0:
        try:
            state, record = initial_state(model, init, dst_classes)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "init.json", json.dumps(record, indent=1) + "\n")
            if world > 1:
                _save_staged(state, staged)
            print(f"[cvtkit] {describe(record)}", flush=True)
        except Exception as e:  # noqa: BLE001 - agreed with the other ranks, then re-raised
            failure = e
    if any_rank(failure is not None):
        if failure is not None:
            raise failure
        raise CheckpointError(f"reading {init.pretrained} failed on rank 0 (its output says why)")
    if rank != 0:
        from safetensors.torch import load_file
        load_state_dict_checked(model, load_file(staged), strict=True, source=str(staged),
                                adapt_pos_embed=False)
    if world > 1:
        dist.barrier()
        if rank == 0:
            staged.unlink(missing_ok=True)


def describe(record: dict) -> str:
    """`fine-tuning from runs/x/checkpoints/step00001000 [deepspeed, step 1000]: 999/1000 head rows
    copied by synset`, plus what was adapted (CeiT's position embedding)."""
    source = ", ".join([record["source_format"]] + (["step %s" % record["step"]] if record["step"] is not None else [])
                       + (["EMA"] if record["use_ema"] else []))
    head = (f"{record['copied']}/{record['copied'] + len(record['missing'])} head rows copied by synset"
            if "copied" in record else f"head {record['head']}")
    return f"fine-tuning from {record['read_from']} [{source}]: {head}" + "".join(f"; {a}" for a in record["adapted"])


def _save_staged(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
