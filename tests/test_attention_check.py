"""The layer-by-layer attention check of the GPU tests (tests/attention_check.py), on CPU: PyTorch's
SDPA passes it in fp32 and bf16 for CvT (k/v at stride 2, the cls token in the last stage) and
CeiT, and a wrong scale, key order or key/value stride fails it on every layer whose output depends
on which keys win, in both dtypes: the check can tell what the GPU tests need it to tell."""
import pytest
import torch

from attention_check import capture, errors, informative, sdpa, sharpen
from cvtkit.models import create_model
from helpers import TINY_CEIT, TINY_CVT


def _strided(t: torch.Tensor) -> torch.Tensor:
    return t[..., ::2, :].repeat_interleave(2, dim=-2)[..., :t.shape[-2], :]


FAULTS = {
    "scale x1.1": lambda q, k, v, scale: sdpa(q, k, v, scale * 1.1),
    "keys in reverse order": lambda q, k, v, scale: sdpa(q, k.flip(-2), v, scale),
    "keys and values read at stride 2": lambda q, k, v, scale: sdpa(q, _strided(k), _strided(v), scale),
}


@pytest.mark.parametrize("name,options,res", [("cvt_13", TINY_CVT, 32), ("cvt_13", {}, 64), ("ceit_tiny", TINY_CEIT, 32)])
def test_sdpa_passes_and_planted_faults_fail(name, options, res):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **options).eval()
    layers = [(sharpen(q, k, scale), k, v, scale) for q, k, v, scale in capture(model, torch.randn(2, 3, res, res))]
    telling = [informative(k, v) for _, k, v, _ in layers]
    assert sum(telling) >= len(layers) - (1 if name.startswith("ceit") else 0)  # CeiT: its class-token layer
    for dtype in (torch.float32, torch.bfloat16):
        for i, (q, k, v, scale) in enumerate(layers):
            fused, plain, bound = errors(q, k, v, scale, dtype)
            assert fused <= bound, (i, dtype, fused, plain)
            if telling[i]:
                for fault, kernel in FAULTS.items():
                    wrong = errors(q, k, v, scale, dtype, fused=kernel)[0]
                    assert wrong > bound, (fault, i, dtype, wrong, bound)
