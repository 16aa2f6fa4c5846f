"""CeiT: Convolution-enhanced image Transformer (Yuan et al., ICCV 2021), as the official `ceit_model.py`.

Image-to-Tokens stem (conv 7x7/2 -> BN -> maxpool, then a 4x4/4 patch conv), 12 pre-norm blocks whose
feed-forward is the Locally-enhanced Feed-Forward (1x1 conv, depthwise 3x3, 1x1 conv, each with BN),
and a Layer-wise Class-token Attention block over the 12 class tokens. Learned absolute position
embeddings, so the input size is fixed at construction (`resize_pos_embed` moves weights to
another one). Module names are the official ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .factory import CENTER_224, CENTER_384, register_model
from .layers import ATTN_IMPLS, Backbone, BatchNorm2dFp32, DropPath, attention, checkpointed, trunc_normal_linear_init


class Image2Tokens(nn.Module):
    """Conv 7x7/2 (no bias) -> BN -> maxpool 3x3/2, no activation: `[B, 3, H, W] -> [B, 64, H/4, W/4]`."""

    def __init__(self, in_chans: int = 3, out_chans: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = BatchNorm2dFp32(out_chans)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.bn(self.conv(x)))


class I2T(nn.Module):
    """Stem plus patch projection: `[B, 3, H, W] -> [B, N, D]` with `N = (H/16) * (W/16)`."""

    def __init__(self, img_size: int, dim: int, in_chans: int = 3, stem_chans: int = 64,
                 patch_size: int = 4):
        super().__init__()
        self.backbone = Image2Tokens(in_chans, stem_chans)
        self.proj = nn.Conv2d(stem_chans, dim, kernel_size=patch_size, stride=patch_size)
        # conv/2 then maxpool/2 each give ceil(H/2) for these paddings.
        feat = math.ceil(math.ceil(img_size / 2) / 2)
        self.grid_size = feat // patch_size
        self.num_patches = self.grid_size ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm-style multi-head self-attention with one fused qkv Linear: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, q, k, v) -> torch.Tensor:
        dropout_p = self.attn_drop if self.training else 0.0
        x = attention(q, k, v, self.scale, dropout_p, self.attn_impl)
        B, _, T, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(*self._qkv(x))


class LCAAttention(Attention):
    """Only the last token queries; keys and values are all tokens: `[B, L, D] -> [B, 1, D]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        return self._attend(q[:, :, -1:], k, v)


class LeFF(nn.Module):
    """Locally-enhanced feed-forward on `[B, 1 + N, D]` with a square N.

    The (LayerNormed) class token passes through unchanged; the patch tokens go through
    1x1 conv -> BN -> GELU -> depthwise 3x3 -> BN -> GELU -> 1x1 conv -> BN (no GELU after
    the last BN, as in the official code).
    """

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3, with_bn: bool = True):
        super().__init__()
        norm = BatchNorm2dFp32 if with_bn else (lambda c: nn.Identity())
        # Registration order follows the official module (conv1, conv2, conv3, then the BNs).
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.conv3 = nn.Conv2d(hidden, dim, 1)
        self.bn1 = norm(hidden)
        self.bn2 = norm(hidden)
        self.bn3 = norm(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        side = math.isqrt(T - 1)
        cls, p = torch.split(x, [1, T - 1], dim=1)
        p = p.transpose(1, 2).reshape(B, D, side, side)
        p = self.act(self.bn1(self.conv1(p)))
        p = self.act(self.bn2(self.conv2(p)))
        p = self.bn3(self.conv3(p))
        return torch.cat([cls, p.flatten(2).transpose(1, 2)], dim=1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Encoder block with LeFF: `[B, 1 + N, D] -> [B, 1 + N, D]`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 attn_drop: float, drop: float, leff_with_bn: bool, attn_impl: str):
        super().__init__()
        ln = lambda: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
        self.norm2 = ln()  # registered before norm1, as in the official module
        self.norm1 = ln()
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop, attn_impl=attn_impl)
        self.leff = LeFF(dim, int(dim * mlp_ratio), with_bn=leff_with_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.leff(self.norm2(x)))


class LCABlock(nn.Module):
    """Layer-wise class-token attention: `[B, L, D]` class tokens -> `[B, 1, D]`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_impl: str):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LCAAttention(dim, num_heads, attn_impl=attn_impl)
        self.feedforward = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        h = c[:, -1:] + self.attn(self.norm1(c))
        return h + self.feedforward(self.norm2(h))


class CeiT(Backbone):
    """`[B, 3, img_size, img_size] -> [B, num_classes]`."""

    def __init__(self, img_size: int = 224, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 in_chans: int = 3, stem_chans: int = 64, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 leff_with_bn: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if img_size % 16:
            raise ValueError(f"CeiT needs an img_size divisible by 16, got {img_size}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.i2t = I2T(img_size, embed_dim, in_chans, stem_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.i2t.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, rates[i], attn_drop_rate, drop_rate,
                  leff_with_bn, attn_impl)
            for i in range(depth)])
        self.lca = LCABlock(embed_dim, num_heads, mlp_ratio, attn_impl)
        # Zero-initialised and left at zero by the official init.
        self.pos_layer_embed = nn.Parameter(torch.zeros(1, depth, embed_dim))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # The official _init_weights touches Linear and LayerNorm only; BN keeps its (1, 0) default.
        self.apply(trunc_normal_linear_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W] -> [B, D]`: the LCA output, normed."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CeiT built for {self.img_size}x{self.img_size} input got "
                             f"{tuple(x.shape[-2:])}; resize pos_embed with resize_pos_embed and "
                             f"build the model with img_size={x.shape[-1]}")
        x = self.i2t(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        cls_per_layer = []
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpointed(blk, x)
            else:
                x = blk(x)
            cls_per_layer.append(x[:, 0])
        c = torch.stack(cls_per_layer, dim=1) + self.pos_layer_embed
        return self.norm(self.lca(c)).flatten(1)

    def init_head(self, head: nn.Linear) -> None:
        trunc_normal_linear_init(head)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """`[1, 1 + g*g, D] -> [1, 1 + grid_size**2, D]`: bicubic on the grid, class token kept.

    The DeiT/CeiT fine-tuning rule (e.g. 14x14 at 224 -> 24x24 at 384), `align_corners=False`.
    """
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"pos_embed has {grid.shape[1]} grid tokens, not a square number")
    if old == grid_size:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, D).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def _ceit(arch: dict, overrides: dict) -> CeiT:
    return CeiT(**{**arch, **overrides})


# Evaluation as DeiT: resize int(256/224 * size) bicubic + centre crop, at 224 and at 384
# (docs/evaluation.md#ceit-at-384).
@register_model(CeiT, {224: CENTER_224}, fixed_res=True)
def ceit_tiny(**overrides) -> CeiT:
    """CeiT-T: 6,356,904 parameters, 1.2 GMACs (conv + linear) at 224."""
    return _ceit(dict(embed_dim=192, num_heads=3, img_size=224), overrides)


@register_model(CeiT, {224: CENTER_224}, fixed_res=True)
def ceit_small(**overrides) -> CeiT:
    """CeiT-S: 24,204,840 parameters, 4.4 GMACs (conv + linear) at 224."""
    return _ceit(dict(embed_dim=384, num_heads=6, img_size=224), overrides)


@register_model(CeiT, {224: CENTER_224}, fixed_res=True)
def ceit_base(**overrides) -> CeiT:
    """CeiT-B: 94,405,416 parameters, 17.0 GMACs (conv + linear) at 224."""
    return _ceit(dict(embed_dim=768, num_heads=12, img_size=224), overrides)


@register_model(CeiT, {384: CENTER_384}, default_res=384, fixed_res=True)
def ceit_tiny_384(**overrides) -> CeiT:
    """CeiT-T at 384 (577 positions): 6,429,864 parameters, 3.6 GMACs (conv + linear)."""
    return _ceit(dict(embed_dim=192, num_heads=3, img_size=384), overrides)


@register_model(CeiT, {384: CENTER_384}, default_res=384, fixed_res=True)
def ceit_small_384(**overrides) -> CeiT:
    """CeiT-S at 384 (577 positions): 24,350,760 parameters, 12.9 GMACs (conv + linear)."""
    return _ceit(dict(embed_dim=384, num_heads=6, img_size=384), overrides)
