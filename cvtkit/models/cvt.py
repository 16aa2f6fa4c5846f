"""CvT: Convolutional vision Transformer (Wu et al., ICCV 2021), as the official `cls_cvt.py`.

Three stages, each a strided conv token embedding followed by transformer blocks whose q/k/v come
from depthwise-conv + BN projections (k/v at stride 2). No position embedding anywhere, so the
same weights run at any input size. The cls token exists only in the last stage. Module and
parameter names are the official ones, so an official `.pth` loads with `strict=True`.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from .factory import CENTER_224, SQUASH_384, register_model
from .layers import (ATTN_IMPLS, Backbone, BatchNorm2dFp32, DropPath, LayerNormFp32, QuickGELU, attention,
                     checkpointed, trunc_normal_linear_init)

LayerNorm = partial(LayerNormFp32, eps=1e-5)


class ConvEmbed(nn.Module):
    """Strided conv then token-wise LayerNorm: `[B, C_in, H, W] -> [B, C, H', W']`."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        # LayerNorm over channels for every position, without leaving NCHW.
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_projection(dim: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (no bias) then BatchNorm2d; the pointwise part is the following Linear."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(dim, dim, kernel_size=3, padding=1, stride=stride, bias=False, groups=dim),
        bn=BatchNorm2dFp32(dim),
    ))


class ConvAttention(nn.Module):
    """Convolutional projection attention (`method='dw_bn'`).

    The cls token bypasses the depthwise conv and BN and is prepended to q, k and v before the
    Linear projections. The scale is `dim ** -0.5` (the full stage width, not the head dim).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, stride_kv: int = 2, stride_q: int = 1,
                 with_cls_token: bool = False, attn_impl: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim ** -0.5
        self.with_cls_token = with_cls_token
        self.attn_impl = attn_impl
        self.conv_proj_q = conv_projection(dim, stride_q)
        self.conv_proj_k = conv_projection(dim, stride_kv)
        self.conv_proj_v = conv_projection(dim, stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, C] -> [B, heads, T, C/heads]`, channel index = head * d + i as `(h d)`."""
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """`x`: `[B, (1+)h*w, C]` (cls token first when present) -> same shape."""
        if self.with_cls_token:
            cls, x = torch.split(x, [1, h * w], dim=1)
        B, _, C = x.shape
        grid = x.transpose(1, 2).reshape(B, C, h, w)
        q, k, v = (proj(grid).flatten(2).transpose(1, 2)
                   for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        if self.with_cls_token:
            q, k, v = (torch.cat([cls, t], dim=1) for t in (q, k, v))
        q = self._heads(self.proj_q(q))
        k = self._heads(self.proj_k(k))
        v = self._heads(self.proj_v(v))
        dropout_p = self.attn_drop if self.training else 0.0
        x = attention(q, k, v, self.scale, dropout_p, self.attn_impl)
        x = x.transpose(1, 2).reshape(B, -1, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: `[B, T, C] -> [B, T, C]`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, with_cls_token: bool, attn_impl: str):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop,
                                  with_cls_token=with_cls_token, attn_impl=attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """One stage (the official `VisionTransformer`): `[B, C_in, H, W] -> ([B, C, H', W'], cls [B, 1, C] | None)`."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, patch_size: int,
                 patch_stride: int, patch_padding: int, mlp_ratio: float, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float, with_cls_token: bool,
                 attn_impl: str):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls_token else None
        self.pos_drop = nn.Dropout(drop_rate)
        # Per-stage linspace (official rule): block j of this stage gets rates[j].
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, rates[j], with_cls_token,
                  attn_impl)
            for j in range(depth)])
        self.grad_checkpointing = False
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(trunc_normal_linear_init)

    def forward(self, x: torch.Tensor):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpointed(blk, x, H, W)
            else:
                x = blk(x, H, W)
        cls_tokens = None
        if self.cls_token is not None:
            cls_tokens, x = torch.split(x, [1, H * W], dim=1)
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return x, cls_tokens


class CvT(Backbone):
    """Convolutional vision Transformer: `[B, 3, H, W] -> [B, num_classes]`, any H and W.

    Stage attributes are named `stage0..stage{n-1}` as in the official code.
    """

    def __init__(self, dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 heads: Sequence[int] = (1, 3, 6), num_classes: int = 1000, in_chans: int = 3,
                 patch_sizes: Sequence[int] = (7, 3, 3), patch_strides: Sequence[int] = (4, 2, 2),
                 patch_paddings: Sequence[int] = (2, 1, 1), mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 cls_token: Sequence[bool] | None = None, attn_impl: str = "sdpa"):
        """`drop_path_rate` is the last stage's rate; the released configs give the other stages 0."""
        super().__init__()
        n = len(dims)
        if not (len(depths) == len(heads) == len(patch_sizes) == len(patch_strides)
                == len(patch_paddings) == n):
            raise ValueError("dims, depths, heads and patch_* must have one entry per stage")
        for dim, h in zip(dims, heads):
            if dim % h:
                raise ValueError(f"stage width {dim} is not divisible by its {h} heads")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        cls_token = list(cls_token) if cls_token is not None else [False] * (n - 1) + [True]
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.use_cls_token = cls_token[-1]
        chans = in_chans
        for i in range(n):
            stage = CvTStage(chans, dims[i], depths[i], heads[i], patch_sizes[i], patch_strides[i],
                             patch_paddings[i], mlp_ratio, drop_rate, attn_drop_rate,
                             drop_path_rate if i == n - 1 else 0.0, cls_token[i], attn_impl)
            setattr(self, f"stage{i}", stage)
            chans = dims[i]
        self.num_stages = n
        self.norm = LayerNorm(dims[-1])
        self.reset_classifier(num_classes)

    def stages(self) -> list[CvTStage]:
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W] -> [B, C_last]`: the normed cls token (or mean of normed tokens).

        Unlike the official `torch.squeeze`, batch size 1 keeps its batch dimension.
        """
        cls_tokens = None
        for stage in self.stages():
            x, cls_tokens = stage(x)
        if self.use_cls_token:
            return self.norm(cls_tokens).flatten(1)
        return self.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)

    def init_head(self, head: nn.Linear) -> None:
        # The official init leaves the head bias at PyTorch's default uniform.
        nn.init.trunc_normal_(head.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"stage{i}.cls_token" for i, s in enumerate(self.stages()) if s.cls_token is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages():
            stage.grad_checkpointing = enable


# 224 evaluation: resize 256 + centre crop 224; 384: square warp, no crop
# (docs/evaluation.md#cvt-at-384).
CVT_EVALS = {224: CENTER_224, 384: SQUASH_384}


def _cvt(arch: dict, overrides: dict) -> CvT:
    return CvT(**{**arch, **overrides})


@register_model(CvT, CVT_EVALS)
def cvt_13(**overrides) -> CvT:
    """CvT-13: 19,997,480 parameters, 4.58 GMACs at 224."""
    return _cvt(dict(dims=(64, 192, 384), heads=(1, 3, 6), depths=(1, 2, 10), drop_path_rate=0.1), overrides)


@register_model(CvT, CVT_EVALS)
def cvt_21(**overrides) -> CvT:
    """CvT-21: 31,622,696 parameters, 7.2 GMACs at 224."""
    return _cvt(dict(dims=(64, 192, 384), heads=(1, 3, 6), depths=(1, 4, 16), drop_path_rate=0.1), overrides)


@register_model(CvT, CVT_EVALS)
def cvt_w24(**overrides) -> CvT:
    """CvT-W24: 277,196,392 parameters, 194.5 GMACs at 384."""
    return _cvt(dict(dims=(192, 768, 1024), heads=(3, 12, 16), depths=(2, 2, 20), drop_path_rate=0.3), overrides)
