"""CUDA paths that CPU runs cannot reach: run with `pytest -m gpu` on a GPU (`make gpu-check`).

Without CUDA every test here skips with the reason; `make test` deselects them (`-m "not gpu"`),
so they never count as CPU coverage, and `make gpu-check` fails any of them that skips.
`GPU_CHECK_OUT`, when set, receives the SDPA kernel report.
"""
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from attention_check import capture, errors, sharpen
from cvtkit.checkpoint import complete_tags, consolidated_state_dict, tag_for
from cvtkit.data.device_batch import DeviceBatch
from cvtkit.data.transforms import AugmentConfig
from cvtkit.models import create_model
from cvtkit.rng import RngState
from helpers import make_tiny_shards, metrics, train, train_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="CUDA is absent: these run on a GPU machine (make gpu-check)")]

KERNEL_REPORT: dict[str, list[str]] = {}
FUSED = {"flash", "memory-efficient"}


def _kernels(q, k, v, scale: float) -> list[str]:
    """Which kernels ran the attention (the CUDA kernel names the profiler saw)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.cuda.synchronize()
    names = {e.key.lower() for e in prof.key_averages()}
    found = [kind for kind, marks in (("flash", ("flash",)), ("memory-efficient", ("efficient", "fmha", "mem_eff")),
                                      ("cudnn", ("cudnn",))) if any(m in n for n in names for m in marks)]
    return found or ["math"]


def _report(case: str, found: list[str]) -> None:
    KERNEL_REPORT[case] = found
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        with open(os.path.join(out, "sdpa_kernels.json"), "w") as f:
            json.dump(KERNEL_REPORT, f, indent=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,res", [("cvt_13", 224), ("cvt_13", 384), ("ceit_tiny", 224), ("ceit_tiny_384", 384)])
def test_sdpa_matches_the_reference_attention_layer_by_layer(name, res, dtype, monkeypatch):
    """Each attention layer's own q, k, v (CvT: the cls token in the last stage, k/v at stride 2, a
    shorter key sequence; CeiT), its attention sharpened as a trained model's: the fused kernel is
    no further from the float64 reference than the einsum path in the same dtype (x2, the ratio
    test of tests/attention_check.py, which catches a wrong scale, key order or stride on CPU).
    TF32 is off, so that fp32 means fp32; in bf16 a fused kernel (flash or memory-efficient) runs."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).cuda().eval()
    layers = capture(model, torch.randn(2, 3, res, res, device="cuda"))
    assert len(layers) >= 3
    kinds: set[str] = set()
    for i, (q, k, v, scale) in enumerate(layers):
        q = sharpen(q, k, scale)
        fused, plain, bound = errors(q, k, v, scale, dtype)
        assert fused <= bound, f"layer {i} q{list(q.shape)} k{list(k.shape)}: |SDPA - exact| {fused:.3g} > " \
                               f"2 x |reference - exact| {plain:.3g} + eps"
        if dtype is torch.bfloat16:
            found = _kernels(*(t.to(dtype) for t in (q, k, v)), scale)
            assert FUSED & set(found), f"layer {i} q{list(q.shape)} k{list(k.shape)}: bf16 ran {found}"
            kinds.update(found)
    if kinds:
        _report(f"{name}@{res} bf16, {len(layers)} layers", sorted(kinds))


def test_cuda_rng_state_is_saved_and_restored():
    state = RngState().state_dict()
    assert "cuda" in state
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    RngState().load_state_dict(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_normalise_erase_and_mixup_run_on_the_device():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8) % 4
    plain = DeviceBatch(None, 4, torch.device("cuda"), torch.bfloat16, channels_last=True)
    x, y = plain(images.pin_memory(), labels.pin_memory())
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    cpu, _ = DeviceBatch(None, 4, torch.device("cpu"), torch.float32, channels_last=False)(images, labels)
    assert torch.allclose(x.float().cpu(), cpu, atol=2e-2)
    assert torch.equal(y.cpu(), labels)
    augment = AugmentConfig(re_prob=1.0, mixup_alpha=0.8, cutmix_alpha=1.0)
    x, y = DeviceBatch(augment, 4, torch.device("cuda"), torch.bfloat16, channels_last=False)(images, labels)
    assert x.device.type == "cuda" and y.device.type == "cuda" and y.shape == (8, 4)
    assert torch.allclose(y.float().sum(dim=1), torch.ones(8, device="cuda"), atol=1e-3)
    assert not torch.allclose(x.float(), plain(images, labels)[0].float().contiguous())


def test_randaugment_on_cuda_gives_the_cpus_pixels():
    """`randaugment_on: device` on CUDA: the same pixels as on the CPU (where they are PIL's to the
    bit, tests/test_randaugment_device.py), 64 crops of the photographs at 224 with their own draws,
    every op drawn; then through DeviceBatch in bf16."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from cvtkit.data.randaugment_device import DeviceRandAugment, RandAugmentDraws, RandAugmented
    from cvtkit.data.transforms import timm_randaugment
    augment = AugmentConfig(randaugment_on="device")
    ra = timm_randaugment(augment, 224)
    photos = [np.asarray(Image.fromarray(load_sample_image(n)).resize((320, 240), Image.BICUBIC))
              for n in ("china.jpg", "flower.jpg")]
    images = torch.stack([torch.from_numpy(photos[i % 2][i % 16:i % 16 + 224, i % 96:i % 96 + 224].copy())
                          .permute(2, 0, 1) for i in range(64)])
    draw, draws = RandAugmentDraws(ra), []
    for i in range(64):
        random.seed(i)
        np.random.seed(i)
        draws.append(draw())
    draws = torch.stack(draws)
    assert len(set(draws[:, :, 0].flatten().long().tolist()) - {-1}) == len(ra.ops)
    apply = DeviceRandAugment(ra)
    on_cuda = apply(images.cuda(), draws)
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), apply(images, draws))
    x, _ = DeviceBatch(augment, 4, torch.device("cuda"), torch.bfloat16, channels_last=True)(
        RandAugmented(images.pin_memory(), draws), torch.arange(64) % 4)
    assert x.shape == (64, 3, 224, 224) and x.dtype == torch.bfloat16 and x.device.type == "cuda"


@pytest.mark.slow
def test_zero2_bf16_over_nccl_killed_mid_run_resumes_to_the_same_masters(tmp_path):
    """One GPU, NCCL, ZeRO-2 bf16, deterministic algorithms, 20 steps with a checkpoint every 10:
    killed (SIGKILL, through the training entry point's fault hook) right after step 13, resumed
    from step 10; the step-20 fp32 masters equal an uninterrupted run's (to 1e-4: bitwise where every
    kernel is deterministic), as do the losses of steps 11-20."""
    shards = make_tiny_shards(tmp_path / "data")
    steps = ["schedule.epochs=null", "schedule.steps=20", "checkpoint.every_steps=10", "log.every_steps=1"]
    env = {"CVTKIT_DETERMINISTIC": "1"}
    codes, out = train(tmp_path / "whole", shards, steps, nproc=1, script="tests/fault_train.py", env=env)
    assert codes == [0], out
    codes, out = train(tmp_path / "killed", shards, steps, nproc=1, script="tests/fault_train.py",
                       env={**env, "CVTKIT_KILL_AT_STEP": "13"})
    killed = tmp_path / "killed" / "tiny_cpu"
    assert codes == [-signal.SIGKILL], out  # interrupted, not finished
    assert max(train_losses(killed)) == 12 and complete_tags(killed / "checkpoints") == [tag_for(10)]
    codes, out = train(tmp_path / "killed", shards, steps, nproc=1, script="tests/fault_train.py", env=env)
    assert codes == [0], out
    assert "resumed from" in out and "at step 10" in out
    whole = tmp_path / "whole" / "tiny_cpu"
    for run in (whole, killed):
        starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
        assert starts and all(s["device"].startswith("cuda") for s in starts), starts
    a, b = (consolidated_state_dict(run / "checkpoints" / tag_for(20)) for run in (whole, killed))
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= 1e-4, diff
    later = {s: v for s, v in train_losses(whole).items() if s > 10}
    resumed = {s: v for s, v in train_losses(killed).items() if s > 10}
    assert later.keys() == resumed.keys() == set(range(11, 21))
    assert all(abs(resumed[s] - later[s]) <= 1e-4 * max(1.0, abs(later[s])) for s in later), (later, resumed)
    assert metrics(killed)[-1]["step"] == 20
