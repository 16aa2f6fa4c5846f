"""Checkpoint formats: written here as the real producers write them, read back strictly."""
import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cvtkit.models import CheckpointError, create_model, load_pretrained, model_from_export, save_export
from cvtkit.models.convert import main as convert_main
from cvtkit.models.weights import hf_to_official, read_checkpoint

from helpers import TINY_CEIT, TINY_CVT

# Official -> HuggingFace names (docs/models.md#huggingface-names), as literal string rewrites
# (independent of the loader's regexes).
OFFICIAL_TO_HF = [
    (r"^stage(\d+)\.patch_embed\.proj\.", r"cvt.encoder.stages.\1.embedding.convolution_embeddings.projection."),
    (r"^stage(\d+)\.patch_embed\.norm\.", r"cvt.encoder.stages.\1.embedding.convolution_embeddings.normalization."),
    (r"^stage(\d+)\.cls_token$", r"cvt.encoder.stages.\1.cls_token"),
    (r"^stage(\d+)\.blocks\.(\d+)\.norm1\.", r"cvt.encoder.stages.\1.layers.\2.layernorm_before."),
    (r"^stage(\d+)\.blocks\.(\d+)\.norm2\.", r"cvt.encoder.stages.\1.layers.\2.layernorm_after."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.conv_proj_q\.conv\.",
     r"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_query.convolution_projection.convolution."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.conv_proj_k\.conv\.",
     r"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_key.convolution_projection.convolution."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.conv_proj_v\.conv\.",
     r"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_value.convolution_projection.convolution."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.conv_proj_q\.bn\.",
     r"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_query.convolution_projection.normalization."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.conv_proj_k\.bn\.",
     r"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_key.convolution_projection.normalization."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.conv_proj_v\.bn\.",
     r"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_value.convolution_projection.normalization."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.proj_q\.", r"cvt.encoder.stages.\1.layers.\2.attention.attention.projection_query."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.proj_k\.", r"cvt.encoder.stages.\1.layers.\2.attention.attention.projection_key."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.proj_v\.", r"cvt.encoder.stages.\1.layers.\2.attention.attention.projection_value."),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.proj\.", r"cvt.encoder.stages.\1.layers.\2.attention.output.dense."),
    (r"^stage(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"cvt.encoder.stages.\1.layers.\2.intermediate.dense."),
    (r"^stage(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"cvt.encoder.stages.\1.layers.\2.output.dense."),
    (r"^norm\.", "layernorm."),
    (r"^head\.", "classifier."),
]


def to_hf(key):
    for pattern, repl in OFFICIAL_TO_HF:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    raise AssertionError(f"no HF name for {key}")


def tiny_cvt(**kw):
    return create_model("cvt_13", num_classes=10, **TINY_CVT, **kw).eval()


def tiny_ceit(**kw):
    return create_model("ceit_tiny", num_classes=10, **{**TINY_CEIT, **kw}).eval()


def randomize_bn(model):
    for name, buf in model.named_buffers():
        if "running_mean" in name:
            buf.uniform_(-0.5, 0.5)
        elif "running_var" in name:
            buf.uniform_(0.5, 1.5)


def assert_same_outputs(a, b, res):
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_hf_names_map_to_official_names():
    pairs = {
        "cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight": "stage0.patch_embed.proj.weight",
        "cvt.encoder.stages.2.cls_token": "stage2.cls_token",
        "cvt.encoder.stages.2.layers.9.attention.attention.convolution_projection_value.convolution_projection.normalization.num_batches_tracked":
            "stage2.blocks.9.attn.conv_proj_v.bn.num_batches_tracked",
        "cvt.encoder.stages.1.layers.0.attention.attention.projection_key.bias": "stage1.blocks.0.attn.proj_k.bias",
        "cvt.encoder.stages.1.layers.0.attention.output.dense.weight": "stage1.blocks.0.attn.proj.weight",
        "cvt.encoder.stages.1.layers.0.output.dense.weight": "stage1.blocks.0.mlp.fc2.weight",
        "cvt.encoder.stages.1.layers.0.intermediate.dense.bias": "stage1.blocks.0.mlp.fc1.bias",
        "cvt.encoder.stages.1.layers.1.layernorm_after.weight": "stage1.blocks.1.norm2.weight",
        "layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
    }
    for hf, official in pairs.items():
        assert hf_to_official(hf) == official


def test_official_cvt_pth_loads_strictly(tmp_path):
    src = tiny_cvt()
    randomize_bn(src)
    torch.save(src.state_dict(), tmp_path / "CvT-13-224x224-IN-1k.pth")
    dst = tiny_cvt()
    report = load_pretrained(dst, tmp_path / "CvT-13-224x224-IN-1k.pth")
    assert report.ok
    assert read_checkpoint(tmp_path / "CvT-13-224x224-IN-1k.pth").source_format == "official"
    assert_same_outputs(src, dst, 48)


def test_ddp_module_prefix_is_stripped(tmp_path):
    src = tiny_cvt()
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddp.pth")
    dst = tiny_cvt()
    load_pretrained(dst, tmp_path / "ddp.pth")
    assert_same_outputs(src, dst, 48)


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "model.safetensors"])
def test_huggingface_checkpoint_loads(tmp_path, fmt):
    src = tiny_cvt()
    randomize_bn(src)
    hf_state = {to_hf(k): v.clone() for k, v in src.state_dict().items()}
    folder = tmp_path / "cvt-13"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "cvt"}))
    if fmt.endswith(".bin"):
        torch.save(hf_state, folder / fmt)
    else:
        save_file(hf_state, folder / fmt)
    for path in (folder, folder / fmt):
        dst = tiny_cvt()
        load_pretrained(dst, path)
        assert read_checkpoint(path).source_format == "huggingface"
        assert_same_outputs(src, dst, 48)


def test_official_ceit_checkpoint_with_ema_and_args(tmp_path):
    model, ema = tiny_ceit(), tiny_ceit()
    randomize_bn(model)
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(),
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "epoch": 299,
                "args": argparse.Namespace(model="ceit_tiny_patch16_224", lr=1e-3, input_size=224)},
               tmp_path / "ceit_tiny.pth")
    dst = tiny_ceit()
    load_pretrained(dst, tmp_path / "ceit_tiny.pth")
    assert_same_outputs(model, dst, 32)
    load_pretrained(dst, tmp_path / "ceit_tiny.pth", use_ema=True)
    assert_same_outputs(ema, dst, 32)
    assert read_checkpoint(tmp_path / "ceit_tiny.pth").source_format == "official-wrapped"


def test_ceit_224_checkpoint_into_a_larger_model_resizes_pos_embed(tmp_path):
    src = tiny_ceit()
    torch.save({"model": src.state_dict()}, tmp_path / "ceit.pth")
    big = tiny_ceit(img_size=64)
    report = load_pretrained(big, tmp_path / "ceit.pth")
    assert big.pos_embed.shape == (1, 1 + 4 * 4, 32)
    assert torch.equal(big.pos_embed[:, 0], src.pos_embed[:, 0])
    assert report.adapted and "pos_embed resized" in report.adapted[0]
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_pretrained(tiny_ceit(img_size=64), tmp_path / "ceit.pth", adapt_pos_embed=False)


def test_export_round_trip(tmp_path):
    src = tiny_cvt()
    randomize_bn(src)
    out = save_export(src, tmp_path / "export", classes=[f"n{i:08d}" for i in range(10)])
    meta = json.loads((out / "cvtkit.json").read_text())
    assert meta["model_name"] == "cvt_13" and meta["num_classes"] == 10
    assert meta["eval"]["384"]["crop_mode"] == "squash" and len(meta["classes"]) == 10
    rebuilt = model_from_export(out).eval()
    assert_same_outputs(src, rebuilt, 48)
    dst = tiny_cvt()
    load_pretrained(dst, out / "model.safetensors")
    assert_same_outputs(src, dst, 48)
    assert read_checkpoint(out).source_format == "export"
    assert not list(out.glob("*.tmp"))


def test_mismatches_are_reported_by_name(tmp_path):
    src = create_model("cvt_13", num_classes=21841, **TINY_CVT)
    state = src.state_dict()
    state["stage9.extra"] = torch.zeros(1)
    del state["norm.bias"]
    torch.save(state, tmp_path / "w24_22k.pth")
    dst = tiny_cvt()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_pretrained(dst, tmp_path / "w24_22k.pth")
    msg = str(info.value)
    assert "w24_22k.pth" in msg and "cvt_13" in msg and "\n" not in msg
    assert "1 missing (norm.bias)" in msg and "1 unexpected (stage9.extra)" in msg
    assert "head.weight: checkpoint [21841, 64] vs model [10, 64]" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing loaded
    report = load_pretrained(dst, tmp_path / "w24_22k.pth", strict=False)
    assert report.missing == ["norm.bias"] and len(report.mismatched) == 2
    assert torch.equal(dst.stage0.patch_embed.proj.weight, src.stage0.patch_embed.proj.weight)


def test_unreadable_and_unsafe_files_fail_clearly(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot be read"):
        load_pretrained(tiny_cvt(), tmp_path / "junk.pth")
    # A pickle that would run code is refused by weights_only loading.
    torch.save({"model": tiny_cvt().state_dict(), "hook": print}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="unsafe.pth"):
        load_pretrained(tiny_cvt(), tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="missing.pth: no such checkpoint"):
        load_pretrained(tiny_cvt(), tmp_path / "missing.pth")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(tiny_cvt(), tmp_path / "no_weights.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_pretrained(tiny_cvt(), tmp_path / "empty")


def test_convert_cli_writes_a_loadable_export(tmp_path, capsys):
    src = create_model("cvt_13", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "CvT-13.pth")
    assert convert_main([str(tmp_path / "CvT-13.pth"), str(tmp_path / "out"), "--model", "cvt_13"]) == 0
    assert "cvt_13, 10 classes" in capsys.readouterr().out
    rebuilt = model_from_export(tmp_path / "out").eval()
    assert_same_outputs(src.eval(), rebuilt, 64)
    # The wrong architecture fails with the keys named, exit code 2.
    assert convert_main([str(tmp_path / "CvT-13.pth"), str(tmp_path / "bad"), "--model", "cvt_21"]) == 2
    assert "does not fit cvt_21" in capsys.readouterr().err
