"""A fused attention kernel against the reference formulation, layer by layer, where the comparison
can tell: on each attention layer's own q, k, v (captured from a forward pass of the model) with
peaked attention. At random init attention is nearly uniform, and a wrong scale, stride or key
order then moves the output (and the logits) far less than bf16 rounding does; trained models
attend sharply, so each layer's q is scaled up by a power of two (exact in any dtype; the same as
scaling that layer's q projection) until its attention logits spread with a standard deviation
of about `SPREAD` over the keys (`sharpen`).

The test is a ratio: with `exact` the reference in float64,

    |fused(dtype) - exact| <= 2 x |reference(dtype) - exact| + eps x max|v|

the fused kernel may be as far off as the einsum path in the same dtype (twice: it sums in
another order), no further. Used by tests/test_gpu.py on CUDA's flash / memory-efficient kernels
and by tests/test_attention_check.py on CPU, where planted faults show that it catches them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import cvtkit.models.ceit as ceit_module
import cvtkit.models.cvt as cvt_module
from cvtkit.models.layers import attention

SPREAD = 3.0  # the attention logits' standard deviation over the keys that `sharpen` aims at
EPS = {torch.float32: 1e-6, torch.bfloat16: 1e-4}  # x max|v|: the floor where both errors vanish


def sharpen(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`q` x 2^n such that the logits `q k^T scale` spread by about SPREAD (std over the keys,
    mean over queries): sharp attention, not one-hot (where a scale would no longer matter)."""
    logits = q.double() @ k.double().transpose(-2, -1) * scale
    spread = logits.std(dim=-1).mean().item()
    return q * 2.0 ** round(math.log2(SPREAD / spread))


def informative(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the output depends on which keys win: values differ across keys (by 10% of their
    size). At init CeiT's class-token attention has nearly equal values, so no kernel error shows."""
    return k.shape[-2] > 1 and (v.double().std(dim=-2).mean() >= 0.1 * v.double().abs().mean()).item()


def capture(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """(q, k, v, scale) of every attention call of one forward pass of `model` on `x`, in order."""
    calls = []
    modules = (cvt_module, ceit_module)
    real = [m.attention for m in modules]

    def spy(q, k, v, scale, dropout_p=0.0, impl="sdpa"):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), scale))
        return attention(q, k, v, scale, dropout_p, impl)
    try:
        for m in modules:
            m.attention = spy
        with torch.no_grad():
            model(x)
    finally:
        for m, fn in zip(modules, real):
            m.attention = fn
    return calls


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def errors(q, k, v, scale: float, dtype: torch.dtype, fused=sdpa) -> tuple[float, float, float]:
    """(|fused - exact|, |reference - exact|, the allowed bound) in `dtype`, largest over elements."""
    exact = attention(q.double(), k.double(), v.double(), scale, impl="reference")
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    fused_err = (fused(qd, kd, vd, scale).double() - exact).abs().max().item()
    plain_err = (attention(qd, kd, vd, scale, impl="reference").double() - exact).abs().max().item()
    return fused_err, plain_err, 2 * plain_err + EPS[dtype] * v.abs().max().item()
