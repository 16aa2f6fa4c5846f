"""Model registry: named variants with their evaluation metadata, timm-style.

    model = create_model("cvt_13", num_classes=1000, drop_path_rate=0.1)
    list_models("ceit*")
"""
from __future__ import annotations

import fnmatch
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch.nn as nn

from cvtkit.errors import CvtkitError

from .layers import ATTN_IMPLS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalConfig:
    """How the official code evaluates a model at one resolution (docs/evaluation.md).

    `crop_mode="center"`: resize the shorter side to `input_size / crop_pct`, centre crop.
    `crop_mode="squash"`: resize straight to `input_size x input_size` (aspect not kept), no crop.
    """
    input_size: int
    crop_pct: float
    crop_mode: str
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_size(self) -> int:
        """Shorter-side resize for `center` (224 / 0.875 = 256); the square side for `squash`."""
        return int(self.input_size / self.crop_pct)


CENTER_224 = EvalConfig(224, 0.875, "center")
SQUASH_384 = EvalConfig(384, 1.0, "squash")
CENTER_384 = EvalConfig(384, 0.875, "center")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_cls: type
    factory: Callable[..., nn.Module]
    eval_cfgs: dict[int, EvalConfig]
    default_res: int
    fixed_res: bool  # True when the weights depend on the input size (position embedding)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(model_cls: type, eval_cfgs: dict[int, EvalConfig], default_res: int = 224,
                   fixed_res: bool = False):
    """Decorator for a variant factory `fn(**overrides) -> model`, registered under its name."""
    def wrap(fn: Callable[..., nn.Module]):
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} registered twice")
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, model_cls, fn, dict(eval_cfgs),
                                            default_res, fixed_res)
        return fn
    return wrap


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r} (available: {', '.join(list_models())})")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 1000, **overrides) -> nn.Module:
    """Build a registered variant; `overrides` replace its architecture arguments.

    The model carries `model_name`, `model_options` (the overrides), `eval_cfgs` ({resolution: EvalConfig}) and `default_res`.
    """
    entry = get_entry(name)
    allowed = set(inspect.signature(entry.model_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown option(s) {unknown} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    if overrides.get("attn_impl", "sdpa") not in ATTN_IMPLS:
        raise ValueError(f"create_model({name!r}): attn_impl must be one of {ATTN_IMPLS}, "
                         f"got {overrides['attn_impl']!r}")
    model = entry.factory(num_classes=num_classes, **overrides)
    model.model_name = name
    model.model_options = dict(overrides)
    res = overrides.get("img_size", entry.default_res)
    model.default_res = res
    model.eval_cfgs = dict(entry.eval_cfgs)
    return model


class EvalResolutionError(CvtkitError, ValueError):
    """A model asked to evaluate at a size its weights are not built for (CeiT's position embedding)."""


def eval_config(model: nn.Module, res: int | None = None) -> EvalConfig:
    """How `model` (from `create_model`) is evaluated at `res` (default: the size it is built for);
    the one place this is decided (docs/evaluation.md).

    The registry's entry when it has one (`model.eval_cfgs`: an export's recorded sizes too).
    CvT runs at any size: elsewhere the official rule applies, a 0.875 centre crop below 384 and a
    square warp from 384 on. CeiT's position embedding fixes its size: at the size it is built
    for it keeps its family's crop, any other size is refused."""
    res = res or model.default_res
    if res in model.eval_cfgs:
        return model.eval_cfgs[res]
    entry = get_entry(model.model_name)
    if entry.fixed_res:
        if res != model.default_res:
            raise EvalResolutionError(
                f"{model.model_name} has no evaluation metadata at {res}: it is built for "
                f"{model.default_res}x{model.default_res} (position embedding); fine-tune it at {res} "
                f"to evaluate there")
        family = entry.eval_cfgs[entry.default_res]
        return EvalConfig(res, family.crop_pct, family.crop_mode)
    return EvalConfig(res, 0.875, "center") if res < 384 else EvalConfig(res, 1.0, "squash")


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups as the official code: no decay for biases, 1-D tensors (norms) and
    `model.no_weight_decay()` names; everything else, depthwise kernels included, decays."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class ModelConfig:
    """The `model:` section of a run config."""
    name: str
    num_classes: int = 1000
    drop_path_rate: float | None = None  # None: the variant's default (CvT: last stage's rate)
    attn_impl: Literal["sdpa", "reference"] = "sdpa"
    grad_checkpointing: bool = False
    img_size: int | None = None  # CeiT only: the input size its position embedding is built for
    options: dict[str, Any] = field(default_factory=dict)  # other architecture overrides

    def __post_init__(self):
        if self.name not in _REGISTRY:
            raise ValueError(f"name: expected one of {', '.join(list_models())}, got {self.name!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: expected >= 0, got {self.num_classes}")
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a value in [0, 1), got {self.drop_path_rate}")
        if self.img_size is not None and not _REGISTRY[self.name].fixed_res:
            raise ValueError(f"img_size: {self.name} runs at any input size; leave img_size unset")

    def architecture(self) -> dict:
        """The architecture beyond `name` and `num_classes` (`options`, CeiT's `img_size`) as JSON
        holds it (lists, not tuples): what a checkpoint's meta.json records of its shape."""
        shape = dict(self.options, **({"img_size": self.img_size} if self.img_size else {}))
        return json.loads(json.dumps(shape))


def build_model(cfg: ModelConfig) -> nn.Module:
    overrides = dict(cfg.options)
    overrides["attn_impl"] = cfg.attn_impl
    if cfg.drop_path_rate is not None:
        overrides["drop_path_rate"] = cfg.drop_path_rate
    if cfg.img_size is not None:
        overrides["img_size"] = cfg.img_size
    model = create_model(cfg.name, num_classes=cfg.num_classes, **overrides)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model
