"""Building blocks shared by CvT and CeiT: activations, fp32 LayerNorm, attention, checkpointing."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTN_IMPLS = ("sdpa", "reference")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the official CvT (not nn.GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's `DropPath` (the same draws, so the same runs): in
    training each sample's residual branch is kept with probability `1 - drop_prob` and scaled by
    its inverse. Ours, not timm's, so that a run whose augmentations need no timm never imports it
    (about 0.5 s of every rank's start; tests/test_startup.py)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, ...] -> [B, ...]`."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:0.3f}"


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as CvT's `LayerNorm`.

    The weights are upcast too, so it also works when DeepSpeed keeps the parameters in bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.type(x.dtype)


class BatchNorm2dFp32(nn.BatchNorm2d):
    """BatchNorm2d that computes in fp32 and keeps fp32 running statistics, whatever the dtype
    of its input and parameters; the output has the input's dtype.

    DeepSpeed's bf16/fp16 modes cast parameters but not buffers, and `.bfloat16()` would round the
    statistics: a plain BatchNorm2d then fails on CPU ("expected scalar type BFloat16 but found
    Float") or mixes dtypes on GPU. Same names and state_dict as nn.BatchNorm2d."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(),
                           self.bias.float(), self.training, self.momentum, self.eps)
        return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              dropout_p: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    """Multi-head attention on `[B, heads, T, d]` tensors, returns `[B, heads, Tq, d]`.

    `sdpa` dispatches to the fused flash / memory-efficient kernels on GPU; `reference` is the
    official einsum + softmax formulation, kept as the ground truth and for benchmarks.
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if impl == "reference":
        attn = torch.einsum("bhlk,bhtk->bhlt", q, k) * scale
        attn = attn.softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return torch.einsum("bhlt,bhtv->bhlv", attn, v)
    raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics on exit.

    Activation checkpointing runs the forward twice; without this the BN running stats would
    take two momentum updates per step instead of one.
    """
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in module.modules()
             if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats]
    try:
        yield
    finally:
        for bn, mean, var, count in saved:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)


def checkpointed(block: nn.Module, *args):
    """Run `block(*args)` under non-reentrant activation checkpointing, BN statistics updated once."""
    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _frozen_batchnorm_stats(block)))


def trunc_normal_linear_init(module: nn.Module) -> None:
    """The official init, applied with `Module.apply`: Linear weights ~ N(0, 0.02) truncated at
    +-2 (absolute, as timm's `trunc_normal_`), zero bias; norm layers weight 1, bias 0.
    Conv layers keep PyTorch's default init, as in both official code bases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Backbone(nn.Module):
    """The interface both families share (timm's): `forward_features` -> `[B, num_features]`,
    `forward_head`, `reset_classifier`, `set_attn_impl`. Subclasses set `num_features`,
    `num_classes`, `head` and `norm`, and say how a new head is initialised."""

    num_features: int
    num_classes: int

    def init_head(self, head: nn.Linear) -> None:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` (0: features only), on the model's device."""
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=self.norm.weight.device)
            self.init_head(self.head)
        else:
            self.head = nn.Identity()

    def set_attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for m in self.modules():
            if hasattr(m, "attn_impl"):
                m.attn_impl = impl
