"""timm's RandAugment (the DeiT recipe's `rand-m9-mstd0.5-inc1`) on the device, per sample.

Two halves, so that the CPU only decodes and crops:
- `RandAugmentDraws`, on the CPU in the loader's worker under the sample's own seed, runs timm's
  own `RandAugment.__call__` with each op's image function replaced by a recorder: the op choice,
  each op's probability test, the magnitude noise and its clipping and the level -> argument
  mapping (its random sign included) are timm's code drawing from the same RNGs in the same order,
  so a sample gets the very draws timm's CPU RandAugment would make for it. They travel with the
  image as float64 `[num_layers, 2]`: (op index, argument) per applied op in order, then rows of -1.
- `DeviceRandAugment` applies them to uint8 `[B, 3, H, W]` on the batch's device, one layer at a
  time; within a layer each kind of op is one batched operation over the samples that drew it:
  - lookup-table ops (autocontrast, equalize, invert, posterize, solarize, solarize-add,
    brightness, contrast): per-sample tables `[n, 3, 256]` (from per-sample histograms), one gather;
  - colour and sharpness: blends with the greyscale / 3x3-smoothed image;
  - rotate, shear, translate: per-sample 2x3 matrices, one sampling pass over all of them.
  PIL's arithmetic is reproduced, not approximated: ImageOps' integer tables, `Image.blend`'s
  float32 blend truncated to uint8, the SMOOTH filter's rounding with its border left as is, and
  `Image.transform`'s affine sampling (pixel centres, taps clamped to the edge, the fill outside the
  image with no blending, PIL's a = -1 bicubic in float64, truncated), so the device's pixels are
  PIL's (tests/test_randaugment_device.py). `grid_sample` cannot do that: its bicubic is a = -0.75
  and it blends the padding into the edge pixels (measured on a photograph rotated 27 degrees: 0.8
  grey levels off on average, up to 12).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import NamedTuple

import torch

from cvtkit.errors import CvtkitError

# timm's op functions (`AugmentOp.aug_fn.__name__`) by how the device applies them.
_LUT = ("auto_contrast", "equalize", "invert", "posterize", "solarize", "solarize_add", "brightness", "contrast")
_BLEND = ("color", "sharpness")
_AFFINE = ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs",
           "translate_y_abs")
_NO_OP = -1  # a draws row after the sample's last applied op


class UnsupportedAugment(CvtkitError):
    """An auto_augment spec with an op the device half does not implement."""


class RandAugmented(NamedTuple):
    """What the loader delivers with `randaugment_on: device`: uint8 images (`[3, H, W]` per sample,
    `[B, 3, H, W]` once collated) and their RandAugment draws (`[L, 2]`, `[B, L, 2]` float64)."""
    images: torch.Tensor
    draws: torch.Tensor


def unsupported_ops(ra) -> list[str]:
    """The op functions of timm's RandAugment `ra` that the device half cannot apply."""
    return sorted({op.aug_fn.__name__ for op in ra.ops} - set(_LUT + _BLEND + _AFFINE))


def _record(index: int, applied: tuple, *args, **_kwargs) -> tuple:
    """Stands in for a timm op's image function: adds (op index, its argument) to the record."""
    assert len(args) <= 1, f"op {index} takes {len(args)} arguments"
    return applied + ((index, float(args[0]) if args else 0.0),)


class RandAugmentDraws:
    """timm's RandAugment `ra`, drawing only: call it where timm's would run (after the flip, under
    the sample's seed) for float64 `[num_layers, 2]`."""

    def __init__(self, ra):
        if isinstance(ra.ops[0].kwargs.get("resample"), (list, tuple)):
            # timm would draw the interpolation inside the op function, which the recorder replaces.
            raise ValueError("a random RandAugment interpolation cannot be drawn ahead of the image")
        self.recorder = copy.copy(ra)
        self.recorder.ops = []
        for index, op in enumerate(ra.ops):
            rec = copy.copy(op)
            rec.aug_fn = functools.partial(_record, index)
            self.recorder.ops.append(rec)
        self.num_layers = ra.num_layers

    def __call__(self) -> torch.Tensor:
        applied = self.recorder(())
        padding = ((_NO_OP, _NO_OP),) * (self.num_layers - len(applied))
        return torch.tensor(applied + padding, dtype=torch.float64)


def _floor_u8(values: torch.Tensor) -> torch.Tensor:
    """PIL's float -> uint8: clamped to [0, 255], truncated (in place: it takes a temporary)."""
    return values.clamp_(0, 255).floor_().to(torch.uint8)


def _blend(base: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`Image.blend(base, image, factor)` on integer-valued float32 tensors: C's float arithmetic
    (`base + factor * (image - base)`, each step rounded to float32), then clamp and truncate."""
    return _floor_u8(base + factor * (image - base))


def _histograms(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[n, 3, H, W]` -> int64 `[n, 3, 256]`: one histogram per sample and channel."""
    n = images.shape[0]
    offsets = torch.arange(n * 3, device=images.device).view(n * 3, 1) * 256
    flat = (images.reshape(n * 3, -1).long() + offsets).flatten()
    return torch.bincount(flat, minlength=n * 3 * 256).view(n, 3, 256)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601-2 in 16-bit fixed point, rounded): int32 `[n, 1, H, W]`."""
    r, g, b = images.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _autocontrast_luts(hist: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`ImageOps.autocontrast` (no cutoff): each channel's [lo, hi] stretched to [0, 255], in
    float64 as Python computes it, truncated; a channel with one level is left alone."""
    present = hist > 0
    lo = present.long().argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).long().argmax(-1, keepdim=True)
    # A true division (`255.0 / tensor` would multiply by a rounded reciprocal).
    scale = torch.full_like(lo, 255, dtype=torch.float64).div((hi - lo).clamp(min=1))
    offset = -lo.double() * scale
    stretched = (levels.double() * scale + offset).trunc().clamp(0, 255).long()
    return torch.where(hi > lo, stretched, levels)


def _equalize_luts(hist: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`ImageOps.equalize`: integer steps of the cumulative histogram, as ImageOps computes them
    (the last occupied level's count left out, the step floored); a zero step (which a channel of
    one level also has) leaves the channel alone. PIL clips table entries above 255."""
    last = 255 - (hist > 0).flip(-1).long().argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, levels)


class DeviceRandAugment:
    """Applies the draws of `RandAugmentDraws` (same timm RandAugment `ra`) to a uint8 batch."""

    def __init__(self, ra):
        bad = unsupported_ops(ra)
        if bad:
            raise UnsupportedAugment(f"data.augment.auto_augment: randaugment_on: device has no "
                                     f"{', '.join(bad)}")
        self.functions = [op.aug_fn.__name__ for op in ra.ops]
        resample = {int(op.kwargs["resample"]) for op in ra.ops}
        assert len(resample) == 1, f"ops with different interpolations: {resample}"
        from PIL import Image
        modes = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}
        self.mode = modes[resample.pop()]
        self.fill = [tuple(op.kwargs["fillcolor"]) for op in ra.ops]
        # timm's solarize_add takes its threshold from its own default.
        from timm.data.auto_augment import solarize_add
        self.add_threshold = inspect.signature(solarize_add).parameters["thresh"].default

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, 3, H, W]` (any device) and the draws `[B, L, 2]` (kept on the CPU: they decide
        which samples each op takes) -> uint8 `[B, 3, H, W]`, a new tensor."""
        out = images.clone()
        draws = draws.cpu()
        for layer in range(draws.shape[1]):
            ops, args = draws[:, layer, 0].long().tolist(), draws[:, layer, 1].tolist()
            for kind, apply in ((_LUT, self._lookup), (_BLEND, self._colour_blend), (_AFFINE, self._affine)):
                chosen = [i for i, op in enumerate(ops) if op != _NO_OP and self.functions[op] in kind]
                if chosen:
                    idx = torch.tensor(chosen, device=images.device)
                    picked = [(self.functions[ops[i]], args[i], ops[i]) for i in chosen]
                    out.index_copy_(0, idx, apply(out.index_select(0, idx), picked))
        return out

    def _lookup(self, images: torch.Tensor, picked: list) -> torch.Tensor:
        """Lookup-table ops: one table per sample and channel, then one gather."""
        dev, n = images.device, images.shape[0]
        fn = [p[0] for p in picked]
        arg = torch.tensor([p[1] for p in picked], dtype=torch.float64, device=dev).view(n, 1, 1)
        levels = torch.arange(256, device=dev).view(1, 1, 256).expand(n, 3, 256)
        hist = _histograms(images) if {"auto_contrast", "equalize"} & set(fn) else None
        tables = {
            "invert": lambda: 255 - levels,
            "posterize": lambda: levels & -(1 << (8 - arg.long()).clamp(0, 8)),
            "solarize": lambda: torch.where(levels < arg, levels, 255 - levels),
            "solarize_add": lambda: torch.where(levels < self.add_threshold,
                                                (levels + arg.long()).clamp(max=255), levels),
            "brightness": lambda: _blend(torch.zeros((), device=dev), levels.float(), arg.float()).long(),
            "contrast": lambda: _blend(self._mean_luma(images), levels.float(), arg.float()).long(),
            "auto_contrast": lambda: _autocontrast_luts(hist, levels),
            "equalize": lambda: _equalize_luts(hist, levels),
        }
        lut = levels.clone()
        for name in set(fn):
            mask = torch.tensor([f == name for f in fn], device=dev).view(n, 1, 1)
            lut = torch.where(mask, tables[name](), lut)
        flat = images.reshape(n, 3, -1).long()
        return lut.to(torch.uint8).gather(2, flat).view_as(images)

    @staticmethod
    def _mean_luma(images: torch.Tensor) -> torch.Tensor:
        """ImageEnhance.Contrast's grey level: the mean of L, rounded half up: float32 `[n, 1, 1]`."""
        luma = _luma(images).flatten(1)
        mean = luma.sum(1).double() / luma.shape[1]
        return (mean + 0.5).floor().float().view(-1, 1, 1)

    def _colour_blend(self, images: torch.Tensor, picked: list) -> torch.Tensor:
        """ImageEnhance.Color (towards L) and Sharpness (towards PIL's SMOOTH filter)."""
        n, dev = images.shape[0], images.device
        factor = torch.tensor([p[1] for p in picked], device=dev).view(n, 1, 1, 1)  # float32, as C's
        is_color = torch.tensor([p[0] == "color" for p in picked], device=dev).view(n, 1, 1, 1)
        x = images.float()
        base = torch.where(is_color, _luma(images).float(), _smooth(images).float())
        return _blend(base, x, factor)

    def _affine(self, images: torch.Tensor, picked: list) -> torch.Tensor:
        """Rotate, shear and translate: `Image.transform(AFFINE)` with per-sample matrices."""
        n, _, h, w = images.shape
        matrices = torch.tensor([_pil_matrix(fn, arg, w, h) for fn, arg, _ in picked],
                                dtype=torch.float64, device=images.device)
        fill = torch.tensor([self.fill[op] for _, _, op in picked], dtype=torch.uint8, device=images.device)
        return _warp(images, matrices, fill, self.mode)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's `ImageFilter.SMOOTH` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, scale 13): integer sums,
    rounded half up (exact: a sum / 13 + 0.5 is never an integer), border pixels unchanged."""
    x = images.short()
    h, w = x.shape[-2:]
    sums = 4 * x[..., 1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            sums = sums + x[..., dy:h - 2 + dy, dx:w - 2 + dx]
    out = images.clone()
    out[..., 1:-1, 1:-1] = ((2 * sums.int() + 13) // 26).to(torch.uint8)
    return out


def _pil_matrix(fn: str, arg: float, w: int, h: int) -> tuple:
    """The 2x3 matrix (output pixel centre -> input point) timm's op hands to `Image.transform`;
    for rotate, the one `Image.rotate` builds (about the centre, cos and sin rounded to 15 places)."""
    if fn == "rotate":
        rad = -math.radians(arg % 360.0)
        a, b, d = round(math.cos(rad), 15), round(math.sin(rad), 15), round(-math.sin(rad), 15)
        cx, cy = w / 2, h / 2  # the centre maps to itself
        return a, b, a * -cx + b * -cy + cx, d, a, d * -cx + a * -cy + cy
    return {"shear_x": (1, arg, 0, 0, 1, 0), "shear_y": (1, 0, 0, arg, 1, 0),
            "translate_x_rel": (1, 0, arg * w, 0, 1, 0), "translate_y_rel": (1, 0, 0, 0, 1, arg * h),
            "translate_x_abs": (1, 0, arg, 0, 1, 0), "translate_y_abs": (1, 0, 0, 0, 1, arg)}[fn]


def _cubic_ints(v1, v2, v3, v4, d):
    """PIL's transform bicubic (a = -1) over integer pixel values `[3, N]`: the polynomial's
    coefficients are exact integers whatever the order (int16); Horner's rule in float64, in place
    (`d * (...)` + `p` is PIL's `p + d * (...)`: both operations are commutative in IEEE)."""
    p2, p3, p4 = v3 - v1, 2 * (v1 - v2) + v3 - v4, v2 - v1 + v4 - v3
    return p4.double().mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(v2)


def _cubic(v1, v2, v3, v4, d):
    """The same over float64 values (the vertical pass), each coefficient in PIL's order."""
    p2 = v3 - v1
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    p4 = (v2 - v1).sub_(v3).add_(v4)
    return p4.mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(v2)


def _linear(v1, v2, d):
    return (v2 - v1).mul_(d).add_(v1)


# On the CPU a temporary above 32 MiB is fresh pages from the OS every time (glibc mmaps it), which
# costs more than the arithmetic on it; the warp takes this many samples at a time there.
_CPU_CHUNK = 4


def _warp(images: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 `[n, 3, H, W]`, float64 `[n, 6]` matrices, uint8 `[n, 3]` fill -> uint8 `[n, 3, H, W]`:
    each output pixel centre mapped to the input, sampled there with the taps clamped to the image,
    `fill` where the point falls outside the image; float64 as PIL."""
    if images.device.type == "cpu" and images.shape[0] > _CPU_CHUNK:
        parts = [slice(i, i + _CPU_CHUNK) for i in range(0, images.shape[0], _CPU_CHUNK)]
        return torch.cat([_warp(images[p], matrices[p], fill[p], mode) for p in parts])
    n, c, h, w = images.shape
    dev = images.device
    px = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    py = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    m = matrices.view(n, 6, 1, 1)
    xin = (m[:, 0] * px + m[:, 1] * py + m[:, 2]).flatten()
    yin = (m[:, 3] * px + m[:, 4] * py + m[:, 5]).flatten()
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = xs - x0, ys - y0
    taps = (-1, 0, 1, 2) if mode == "bicubic" else (0, 1)
    # Planes `[3, n * H * W]`: one index per tap serves the three channels.
    planes = images.permute(1, 0, 2, 3).reshape(c, n * h * w)
    first = torch.arange(n, device=dev).repeat_interleave(h * w) * (h * w)  # each sample's first pixel
    cols = [(x0 + t).clamp(0, w - 1).long() for t in taps]

    def row(t):
        base = first + (y0 + t).clamp(0, h - 1).long() * w
        values = [planes.index_select(1, base + col) for col in cols]
        if mode == "bicubic":
            return _cubic_ints(*(v.short() for v in values), dx)
        return _linear(*(v.double() for v in values), dx)

    rows = [row(t) for t in taps]
    sampled = _cubic(*rows, dy) if mode == "bicubic" else _linear(*rows, dy)
    out = torch.where(inside, _floor_u8(sampled), fill.t().repeat_interleave(h * w, dim=1))
    return out.view(c, n, h, w).permute(1, 0, 2, 3).contiguous()
