"""Reading and writing model weights in every supported format, strictly.

Formats read (detected from the content, not the file name):
- official CvT `.pth`: a flat state_dict with the official names;
- official CeiT / DeiT-style `.pth`: `{'model': ..., 'model_ema': ..., 'args': Namespace, ...}`;
- HuggingFace `microsoft/cvt-*`: `pytorch_model.bin` or `model.safetensors` (or their folder),
  names mapped as in docs/models.md (the HuggingFace names);
- the project's exports: a folder with `model.safetensors` and `cvtkit.json`;
- the project's training runs (DeepSpeed, any ZeRO stage): a run folder (its newest complete
  checkpoint), its `checkpoints/` folder or one tag folder, consolidated with DeepSpeed's own
  `zero_to_fp32` (`cvtkit.checkpoint.consolidated_state_dict`).
Pickles are read with `torch.load(weights_only=True)`; no code from a checkpoint ever runs. The
exception is a DeepSpeed checkpoint, which DeepSpeed itself unpickles: read runs you trust.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cvtkit.checkpoint import (ResumeError, consolidated_state_dict, find_tag_folder, read_meta, run_config_file,
                               shared_state_file)
from cvtkit.errors import CvtkitError

from .ceit import CeiT, resize_pos_embed
from .factory import EvalConfig, ModelConfig, build_model, create_model, list_models

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_META = "cvtkit.json"
EXPORT_FORMAT = "cvtkit-export/1"

# HuggingFace `CvtForImageClassification` name -> official name (docs/models.md), applied in order.
_HF_TO_OFFICIAL = [
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.", r"stage\1.patch_embed.proj."),
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.", r"stage\1.patch_embed.norm."),
    (r"^cvt\.encoder\.stages\.(\d+)\.cls_token$", r"stage\1.cls_token"),
    (r"^cvt\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stage\1.blocks.\2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.convolution\.",
     r".attn.conv_proj_\1.conv."),
    (r"\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.normalization\.",
     r".attn.conv_proj_\1.bn."),
    (r"\.attention\.attention\.projection_(query|key|value)\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"(conv_proj|proj)_query", r"\1_q"),
    (r"(conv_proj|proj)_key", r"\1_k"),
    (r"(conv_proj|proj)_value", r"\1_v"),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


class CheckpointError(CvtkitError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """Weights under the official names, plus what is known about where they came from."""
    state_dict: dict[str, torch.Tensor]
    source_format: str  # "official", "official-wrapped", "huggingface", "export" or "deepspeed"
    path: Path
    metadata: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs model [..]"
    adapted: list[str] = field(default_factory=list)  # e.g. a resized position embedding

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 4) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if items:
                shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
                parts.append(f"{len(items)} {label} ({shown})")
        return "; ".join(parts) or "all keys match"


def hf_to_official(key: str) -> str:
    for pattern, repl in _HF_TO_OFFICIAL:
        key = re.sub(pattern, repl, key)
    return key


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _torch_load(path: Path) -> object:
    # DeiT/CeiT training checkpoints pickle their argparse Namespace; it holds plain values only.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _resolve_file(path: Path) -> Path:
    if path.is_dir():
        for name in (EXPORT_WEIGHTS, "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: folder has neither {EXPORT_WEIGHTS} nor pytorch_model.bin")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def _read_deepspeed(tag_dir: Path, use_ema: bool) -> Checkpoint:
    """A checkpoint of a cvtkit run (or any DeepSpeed tag folder), consolidated. `metadata` holds
    what the run recorded: `model_name`, `num_classes`, `classes` (synsets, or None), `step`,
    and `run_config` (the run's resolved config.yaml) when the run folder has one."""
    import yaml

    state = consolidated_state_dict(tag_dir)
    if use_ema:
        ema_file = shared_state_file(tag_dir, "ema")
        if not ema_file.is_file():
            raise CheckpointError(f"{tag_dir}: has no {ema_file.name} (the run kept no EMA: ema.decay was 0)")
        state.update(torch.load(ema_file, map_location="cpu", weights_only=True))
    meta, config_file = read_meta(tag_dir), run_config_file(tag_dir)
    run_config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    metadata = {"model_name": meta.get("model"), "num_classes": meta.get("num_classes"),
                "classes": meta.get("classes"), "step": meta.get("step"), "zero_stage": meta.get("zero_stage"),
                "res": meta.get("res"), "eval_res": meta.get("eval_res"), "precision": meta.get("precision"),
                "run_config": run_config, "use_ema": use_ema}
    return Checkpoint(state, "deepspeed", tag_dir, metadata)


def read_checkpoint(path: str | Path, use_ema: bool = False) -> Checkpoint:
    """Read weights from any supported format; returns them under the official names."""
    path = Path(path)
    if path.is_dir():
        try:
            tag_dir = find_tag_folder(path)
        except ResumeError as e:
            raise CheckpointError(str(e)) from None
        if tag_dir is not None:
            return _read_deepspeed(tag_dir, use_ema)
    file = _resolve_file(path)
    metadata: dict = {}
    if file.suffix == ".safetensors":
        try:
            raw: object = load_file(file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        meta_file = file.parent / EXPORT_META
        if meta_file.is_file():
            metadata = json.loads(meta_file.read_text())
    else:
        raw = _torch_load(file)

    source = "official"
    if not _is_tensor_dict(raw):
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{file}: expected a dict of tensors, got {type(raw).__name__}")
        wrapper = "model_ema" if use_ema else None
        for key in ([wrapper] if wrapper else []) + ["state_dict", "model", "module"]:
            if _is_tensor_dict(raw.get(key)):
                raw, source = raw[key], "official-wrapped"
                break
        else:
            wanted = "'model_ema'" if use_ema else "'state_dict', 'model' or 'module'"
            raise CheckpointError(f"{file}: no weights found: expected a flat state_dict or a "
                                  f"dict with {wanted} (keys: {sorted(raw)[:8]})")
    elif use_ema:
        raise CheckpointError(f"{file}: has no 'model_ema' entry (a flat state_dict)")

    state = dict(raw)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("cvt.") or k.startswith("classifier.") for k in state):
        state = {hf_to_official(k): v for k, v in state.items()}
        source = "huggingface"
    if metadata.get("format") == EXPORT_FORMAT:
        source = "export"
    return Checkpoint(state, source, file, metadata)


def _adapt_pos_embed(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> None:
    """A CeiT checkpoint from another resolution: resize its position embedding (DeiT rule)."""
    if isinstance(model, CeiT) and "pos_embed" in state:
        have, want = state["pos_embed"].shape, model.pos_embed.shape
        if have != want and have[0] == 1 and have[2] == want[2]:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.i2t.grid_size)
            report.adapted.append(f"pos_embed resized bicubically {tuple(have)} -> {tuple(want)}")


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "state_dict", adapt_pos_embed: bool = True) -> LoadReport:
    """Load `state` into `model`, comparing names and shapes first.

    `strict=True`: any missing, unexpected or mis-shaped tensor raises `CheckpointError` naming
    `source` and the keys, and nothing is loaded. `strict=False`: the matching tensors are loaded,
    the rest reported.
    """
    state = dict(state)
    report = LoadReport()
    if adapt_pos_embed:
        _adapt_pos_embed(model, state, report)
    own = model.state_dict()
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                         for k in own if k in state and state[k].shape != own[k].shape]
    name = getattr(model, "model_name", type(model).__name__)
    if strict and not report.ok:
        raise CheckpointError(f"{source}: does not fit {name}: {report.summary()}")
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return report


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True, use_ema: bool = False,
                    adapt_pos_embed: bool = True) -> LoadReport:
    """Load weights from any supported format into `model` (see the module docstring)."""
    ckpt = read_checkpoint(path, use_ema=use_ema)
    return load_state_dict_checked(model, ckpt.state_dict, strict=strict, source=str(ckpt.path),
                                   adapt_pos_embed=adapt_pos_embed)


def save_export(model: nn.Module, out_dir: str | Path, classes: list | None = None,
                extra: dict | None = None) -> Path:
    """Write `out_dir/model.safetensors` (official names) and `out_dir/cvtkit.json`, atomically
    per file. `model` must come from `create_model` (its name and options are recorded)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": EXPORT_FORMAT,
        "model_name": model.model_name,
        "model_options": getattr(model, "model_options", {}),
        "num_classes": model.num_classes,
        "classes": classes,
        "eval": {str(res): dataclasses.asdict(cfg) for res, cfg in model.eval_cfgs.items()},
        **(extra or {}),
    }
    tmp = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(state, tmp, metadata={"format": EXPORT_FORMAT, "model_name": model.model_name})
    tmp.replace(out / EXPORT_WEIGHTS)
    tmp = out / (EXPORT_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / EXPORT_META)
    return out


def checkpoint_classes(ckpt: Checkpoint) -> list[str] | None:
    """The synsets of the checkpoint's classifier rows, where it records them (runs, exports)."""
    classes = ckpt.metadata.get("classes")
    if not classes:
        return None
    return [c["synset"] if isinstance(c, Mapping) else str(c) for c in classes]


def model_from_checkpoint(path: str | Path, model_name: str | None = None,
                          use_ema: bool = False) -> tuple[nn.Module, Checkpoint]:
    """Build the model a checkpoint describes and load its weights strictly.

    Exports and training runs name their model and its options (an export's evaluation
    metadata is restored too); an official or HuggingFace file needs `model_name`, and its
    class count is read from the head."""
    ckpt = read_checkpoint(path, use_ema=use_ema)
    return _model_for(ckpt, model_name), ckpt


def _model_for(ckpt: Checkpoint, model_name: str | None) -> nn.Module:
    meta = ckpt.metadata
    described = meta.get("model_name") if model_name in (None, meta.get("model_name")) else None
    if ckpt.source_format == "export" and described:
        model = create_model(described, num_classes=meta["num_classes"], **meta.get("model_options", {}))
        for res, cfg in meta.get("eval", {}).items():
            model.eval_cfgs.setdefault(int(res), EvalConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in cfg.items()}))
    elif ckpt.source_format == "deepspeed" and described and meta.get("run_config"):
        model = build_model(ModelConfig(**{**meta["run_config"]["model"], "grad_checkpointing": False}))
    else:
        name = model_name or meta.get("model_name")
        if name is None:
            raise CheckpointError(f"{ckpt.path}: does not say which model it holds; name it "
                                  f"(one of {', '.join(list_models())})")
        head = ckpt.state_dict.get("head.weight")
        model = create_model(name, num_classes=head.shape[0] if head is not None else 0)
    load_state_dict_checked(model, ckpt.state_dict, source=str(ckpt.path))
    return model


def model_from_export(path: str | Path) -> nn.Module:
    """Build the model an export describes and load its weights strictly."""
    ckpt = read_checkpoint(path)
    if ckpt.source_format != "export":
        raise CheckpointError(f"{ckpt.path}: not a cvtkit export (no {EXPORT_META} beside it)")
    return _model_for(ckpt, None)
