"""CUDA paths that CPU runs cannot reach: run with `pytest -m gpu` on a GPU (`make gpu-check`).

Without CUDA every test here skips with the reason; `make test` deselects them (`-m "not gpu"`),
so they never count as CPU coverage. `GPU_CHECK_OUT`, when set, receives the SDPA kernel report.
"""
import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

import cvtkit.models.ceit as ceit_module
import cvtkit.models.cvt as cvt_module
from cvtkit.checkpoint import COMPLETE, tag_for
from cvtkit.data.device_batch import DeviceBatch
from cvtkit.data.transforms import AugmentConfig
from cvtkit.models import create_model
from cvtkit.train.state import rng_state, set_rng_state
from helpers import make_tiny_shards, spawn, train, train_argv, train_losses, wait

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="CUDA is absent: these run on a GPU machine (make gpu-check)")]

KERNEL_REPORT: dict[str, list[str]] = {}


def _record_kernels(case: str, q, k, v, scale: float) -> None:
    """Which fused kernels run the attention of `case` (the CUDA kernel names the profiler saw)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.cuda.synchronize()
    names = {e.key.lower() for e in prof.key_averages()}
    found = [kind for kind, marks in (("flash", ("flash",)), ("memory-efficient", ("efficient", "fmha", "mem_eff")),
                                      ("cudnn", ("cudnn",))) if any(m in n for n in names for m in marks)]
    KERNEL_REPORT[case] = found or ["math"]
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        with open(os.path.join(out, "sdpa_kernels.json"), "w") as f:
            json.dump(KERNEL_REPORT, f, indent=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("name,res", [("cvt_13", 224), ("cvt_13", 384), ("ceit_tiny", 224), ("ceit_tiny_384", 384)])
def test_sdpa_matches_the_reference_attention(name, res, dtype, tol, monkeypatch):
    """CvT (the cls token in the last stage, k/v at stride 2: a shorter key sequence) and CeiT, in
    fp32 and bf16: the fused kernels give the reference einsum path's logits."""
    torch.manual_seed(0)
    sdpa = create_model(name, num_classes=10).cuda().eval().to(dtype)
    ref = create_model(name, num_classes=10, attn_impl="reference").cuda().eval().to(dtype)
    ref.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, res, res, device="cuda", dtype=dtype)
    seen = []
    module = cvt_module if name.startswith("cvt") else ceit_module
    real = module.attention

    def spy(q, k, v, scale, dropout_p=0.0, impl="sdpa"):
        if impl == "sdpa" and not seen:
            seen.append((q.detach(), k.detach(), v.detach(), scale))
        return real(q, k, v, scale, dropout_p, impl)

    monkeypatch.setattr(module, "attention", spy)
    with torch.no_grad():
        a, b = sdpa(x).float(), ref(x).float()
    assert a.shape == (2, 10)
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
    q, k, v, scale = seen[0]
    _record_kernels(f"{name}@{res} {str(dtype).removeprefix('torch.')} q{list(q.shape)} k{list(k.shape)}",
                    q, k, v, scale)


def test_cuda_rng_state_is_saved_and_restored():
    state = rng_state()
    assert "cuda" in state
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    set_rng_state(state)
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
def test_zero2_bf16_over_nccl_killed_after_a_save_resumes_with_the_same_losses(tmp_path):
    """One GPU, NCCL, ZeRO-2 bf16, 20 steps: killed (SIGKILL) once the step-10 checkpoint is
    complete, then resumed; the continued losses match an uninterrupted run's. cuDNN's backward
    kernels are not bitwise deterministic, so the match is to a tolerance, not to the bit."""
    shards = make_tiny_shards(tmp_path / "data")
    steps = ["schedule.steps=20", "checkpoint.every_steps=10", "log.every_steps=1"]
    codes, out = train(tmp_path / "whole", shards, steps, nproc=1)
    assert codes == [0], out
    assert "ZeRO-2 bf16" in out
    whole = train_losses(tmp_path / "whole" / "tiny_cpu")
    procs = spawn(1, train_argv(tmp_path / "killed", shards, steps))
    marker = tmp_path / "killed" / "tiny_cpu" / "checkpoints" / tag_for(10) / COMPLETE
    deadline = time.time() + 240
    while not marker.is_file() and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.is_file(), wait(procs)[1]
    procs[0].send_signal(signal.SIGKILL)
    wait(procs)
    codes, out = train(tmp_path / "killed", shards, steps, nproc=1)
    assert codes == [0], out
    assert "resumed from" in out
    resumed = train_losses(tmp_path / "killed" / "tiny_cpu")
    later = [s for s in whole if s > 10]
    assert later and all(abs(resumed[s] - whole[s]) <= 1e-2 * max(1.0, abs(whole[s])) for s in later), \
        {s: (whole[s], resumed.get(s)) for s in later}
