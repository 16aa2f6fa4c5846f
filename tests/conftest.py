import pytest
import torch

# Tiny architectures with the real structure: a few stages of width 16-64.
TINY_CVT = dict(dims=(16, 32, 64), heads=(1, 2, 2), depths=(1, 1, 2))
TINY_CEIT = dict(embed_dim=32, num_heads=2, depth=3, img_size=32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
