"""JPEG bytes -> training crops without PIL's full-size path (the fast half of the DeiT recipe).

`DeitCropDecoder` does what timm's `RandomResizedCropAndInterpolation` + flip + RandAugment do
to a PIL image, from the JPEG bytes:
1. the crop is drawn from the header's size alone (`RandomResizedCropParams`, timm's algorithm:
   area in `scale`, log-uniform aspect in `ratio`, 10 attempts, then the centre fallback);
2. the JPEG is decoded by libjpeg-turbo (simplejpeg), at 1/2, 1/4 or 1/8 of its size when the
   crop still spans the output size there: those are libjpeg-turbo's SIMD scales (its other
   N/8 scales are plain C and measured slower than a full decode);
3. crop and resize to the output size with PyTorch's antialiased bicubic on uint8 (the kernel of
   PIL's bicubic; within 1 grey level of PIL, about 4x faster);
4. flip, then timm's own RandAugment (or colour jitter) on a PIL image of the output size, or,
   with `randaugment_on: device`, only RandAugment's draws, which travel with the image.
Anything libjpeg-turbo cannot read (PNG, CMYK) goes through PIL instead; what PIL cannot read
either raises, and the loader skips and counts it.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .randaugment_device import RandAugmented

DCT_REDUCTIONS = (8, 4, 2, 1)  # libjpeg-turbo's fast (SIMD) scaled IDCTs, largest reduction first


@dataclass(frozen=True)
class RandomResizedCropParams:
    """timm's `RandomResizedCropAndInterpolation.get_params`, on an image size instead of an
    image, drawing from Python's `random` as timm does (the loader seeds it per sample)."""
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def sample(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = random.uniform(*self.scale) * area
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if w <= width and h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header; other formats through PIL (which reads headers only)."""
    import simplejpeg
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return width, height
    except ValueError:  # not a JPEG libjpeg-turbo reads: PIL's opinion decides
        return Image.open(io.BytesIO(data)).size


def dct_reduction(crop_w: int, crop_h: int, size: int) -> int:
    """The largest fast DCT reduction at which the crop still spans `size` pixels both ways."""
    return next(k for k in DCT_REDUCTIONS if k == 1 or min(crop_w, crop_h) >= size * k)


def decode_rgb(data: bytes, reduction: int = 1) -> tuple[np.ndarray, int]:
    """HWC uint8 RGB, at 1/`reduction` of the size where libjpeg-turbo reads the file; returns the
    reduction applied (1 for what only PIL reads)."""
    import simplejpeg
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // reduction),
                                      min_width=-(-width // reduction)), reduction
    except ValueError:  # PNG, CMYK, a damaged JPEG: PIL decodes it or raises for the loader
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB")), 1


def resized_crop(pixels: np.ndarray, box: tuple[int, int, int, int], reduction: int, size: int,
                 mode: str = "bicubic") -> np.ndarray:
    """The crop `box` (top, left, h, w in full-size pixels) of `pixels` (decoded at 1/reduction)
    resized to HWC uint8 `[size, size, 3]` with an antialiased filter."""
    top, left, h, w = box
    if reduction == 1:
        # Channels-last in and out: PyTorch's uint8 kernels are vectorised over interleaved RGB.
        region = torch.from_numpy(pixels[top:top + h, left:left + w]).permute(2, 0, 1)[None]
        region = region.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(region, size=(size, size), mode=mode, antialias=True)
        return out[0].permute(1, 2, 0).contiguous().numpy()
    # A reduced decode puts the crop's edges between pixels; PIL's resize takes a fractional box.
    r = reduction
    img = Image.fromarray(pixels).resize((size, size), _PIL_FILTERS[mode],
                                         box=(left / r, top / r, (left + w) / r, (top + h) / r))
    return np.array(img)


_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class DeitCropDecoder:
    """JPEG bytes -> uint8 `[3, size, size]`: timm's DeiT training transform (random resized crop,
    flip, RandAugment) without random erasing and normalisation, which run on the device."""
    takes_bytes = True  # the loader calls `decode` on the sample's bytes, then the decoder on that

    def __init__(self, scale, ratio, hflip: float, interpolation: str, size: int, colour=None, draws=None):
        """`colour`: the PIL transform after the flip (timm's RandAugment), or None. `draws`
        (`randaugment_device.RandAugmentDraws`) instead: the image stops after the flip and comes
        with RandAugment's draws for the device, as a `RandAugmented` pair."""
        assert colour is None or draws is None, "RandAugment on the CPU or on the device, not both"
        self.crop = RandomResizedCropParams(tuple(scale), tuple(ratio))
        self.hflip, self.mode, self.size, self.colour, self.draws = hflip, interpolation, size, colour, draws

    def decode(self, data: bytes,
               reading=contextlib.nullcontext) -> tuple[np.ndarray, tuple[int, int, int, int], int]:
        """Draw the crop from the header, decode what it needs: (pixels, crop box, reduction).
        `reading()` is entered around the two calls that read `data`, and only those (the loader
        counts what they raise as damaged data; the crop and the scale are code, not data)."""
        with reading():
            size = jpeg_size(data)
        box = self.crop.sample(*size)
        reduction = dct_reduction(box[3], box[2], self.size)
        with reading():
            pixels, reduction = decode_rgb(data, reduction)
        return pixels, box, reduction

    def __call__(self, decoded: tuple[np.ndarray, tuple[int, int, int, int], int]):
        out = resized_crop(*decoded, self.size, self.mode)
        flip = random.random() < self.hflip
        if self.colour is not None:
            img = Image.fromarray(out)
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return torch.from_numpy(np.array(self.colour(img))).permute(2, 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(out[:, ::-1]) if flip else out).permute(2, 0, 1)
        if self.draws is None:
            return image
        # Drawn right after the flip, where timm's RandAugment would draw on the CPU.
        return RandAugmented(image, self.draws())

    def from_bytes(self, data: bytes) -> torch.Tensor:
        return self(self.decode(data))
