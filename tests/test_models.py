"""The model zoo against the official code (docs/models.md): sizes, names, behaviour, numerics."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtkit.models import (CeiT, CvT, create_model, eval_config, list_models, resize_pos_embed,
                           weight_decay_groups)
from cvtkit.models.layers import QuickGELU

from helpers import TINY_CEIT, TINY_CVT

NAMES = ["ceit_base", "ceit_small", "ceit_small_384", "ceit_tiny", "ceit_tiny_384",
         "cvt_13", "cvt_21", "cvt_w24"]

# Trainable parameters at 1000 classes, as the official code counts them
# (docs/models.md#parameters-and-macs).
PARAMS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696, "cvt_w24": 277_196_392,
          "ceit_tiny": 6_356_904, "ceit_small": 24_204_840, "ceit_base": 94_405_416,
          "ceit_tiny_384": 6_429_864, "ceit_small_384": 24_350_760}


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_registry_lists_the_variants():
    assert list_models() == NAMES
    assert list_models("cvt*") == ["cvt_13", "cvt_21", "cvt_w24"]
    with pytest.raises(ValueError, match="unknown model 'cvt_99'.*cvt_13"):
        create_model("cvt_99")
    with pytest.raises(ValueError, match="unknown option.*'depht'"):
        create_model("cvt_13", depht=3)
    with pytest.raises(ValueError, match="attn_impl"):
        create_model("cvt_13", attn_impl="flash")


@pytest.mark.parametrize("name", NAMES)
def test_exact_parameter_count(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_cvt_w24_buffers_and_22k_head():
    # The official model zoo's 277.3M counts the BN running buffers too
    # (docs/models.md#parameters-and-macs).
    model = meta_model("cvt_w24")
    buffers = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert PARAMS["cvt_w24"] + buffers == 277_330_792
    # The paper's 298.3M is roughly the 21,841-class pretraining head.
    big = meta_model("cvt_w24", num_classes=21841)
    assert sum(p.numel() for p in big.parameters()) == PARAMS["cvt_w24"] - 1_025_000 + 1025 * 21841


def official_cvt_keys(dims, depths):
    """Official CvT state_dict names, written out from docs/models.md#cvt-names."""
    keys = []
    for i, (c, depth) in enumerate(zip(dims, depths)):
        keys += [f"stage{i}.patch_embed.proj.weight", f"stage{i}.patch_embed.proj.bias",
                 f"stage{i}.patch_embed.norm.weight", f"stage{i}.patch_embed.norm.bias"]
        if i == len(dims) - 1:
            keys.append(f"stage{i}.cls_token")
        for j in range(depth):
            b = f"stage{i}.blocks.{j}."
            keys += [b + "norm1.weight", b + "norm1.bias"]
            for p in "qkv":
                keys.append(b + f"attn.conv_proj_{p}.conv.weight")
                keys += [b + f"attn.conv_proj_{p}.bn.{s}" for s in
                         ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
            for p in ("proj_q", "proj_k", "proj_v", "proj"):
                keys += [b + f"attn.{p}.weight", b + f"attn.{p}.bias"]
            keys += [b + "norm2.weight", b + "norm2.bias", b + "mlp.fc1.weight", b + "mlp.fc1.bias",
                     b + "mlp.fc2.weight", b + "mlp.fc2.bias"]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("name,depths,count", [("cvt_13", (1, 2, 10), 459),
                                               ("cvt_21", (1, 4, 16), 731),
                                               ("cvt_w24", (2, 2, 20), 833)])
def test_cvt_official_key_names(name, depths, count):
    state = meta_model(name).state_dict()
    assert len(state) == count
    assert set(state) == set(official_cvt_keys((0, 0, 0), depths))
    # Each block holds 34 entries, 3 of them num_batches_tracked.
    assert sum(k.startswith("stage2.blocks.0.") for k in state) == 34


def test_cvt_13_shapes():
    state = meta_model("cvt_13").state_dict()
    assert state["stage0.patch_embed.proj.weight"].shape == (64, 3, 7, 7)
    assert state["stage1.patch_embed.proj.weight"].shape == (192, 64, 3, 3)
    assert state["stage2.cls_token"].shape == (1, 1, 384)
    assert state["stage2.blocks.0.attn.conv_proj_k.conv.weight"].shape == (384, 1, 3, 3)
    assert state["stage1.blocks.1.mlp.fc1.weight"].shape == (768, 192)
    assert state["head.weight"].shape == (1000, 384)


def official_ceit_keys(depth=12):
    """Official CeiT names, written out from docs/models.md#ceit-names."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["cls_token", "pos_embed", "pos_layer_embed", "i2t.backbone.conv.weight",
            *[f"i2t.backbone.bn.{s}" for s in bn], "i2t.proj.weight", "i2t.proj.bias"]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [b + "norm2.weight", b + "norm2.bias", b + "norm1.weight", b + "norm1.bias",
                 b + "attn.qkv.weight", b + "attn.qkv.bias", b + "attn.proj.weight", b + "attn.proj.bias"]
        for c in ("conv1", "conv2", "conv3"):
            keys += [b + f"leff.{c}.weight", b + f"leff.{c}.bias"]
        for n in ("bn1", "bn2", "bn3"):
            keys += [b + f"leff.{n}.{s}" for s in bn]
    keys += ["lca.norm2.weight", "lca.norm2.bias", "lca.norm1.weight", "lca.norm1.bias",
             "lca.attn.qkv.weight", "lca.attn.qkv.bias", "lca.attn.proj.weight", "lca.attn.proj.bias",
             "lca.feedforward.fc1.weight", "lca.feedforward.fc1.bias",
             "lca.feedforward.fc2.weight", "lca.feedforward.fc2.bias",
             "norm.weight", "norm.bias", "head.weight", "head.bias"]
    return keys


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("ceit")])
def test_ceit_official_key_names(name):
    state = meta_model(name).state_dict()
    assert set(state) == set(official_ceit_keys())
    D = state["cls_token"].shape[-1]
    n_pos = 577 if name.endswith("384") else 197
    assert state["pos_embed"].shape == (1, n_pos, D)
    assert state["i2t.backbone.conv.weight"].shape == (64, 3, 7, 7)
    assert state["i2t.proj.weight"].shape == (D, 64, 4, 4)
    assert state["blocks.0.leff.conv1.weight"].shape == (4 * D, D, 1, 1)
    assert state["blocks.0.leff.conv2.weight"].shape == (4 * D, 1, 3, 3)
    assert state["pos_layer_embed"].shape == (1, 12, D)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_variant(name):
    """Real variant, small input: finite logits, gradients reach every parameter."""
    extra = {"img_size": 64} if name.startswith("ceit") else {}
    model = create_model(name, num_classes=7, **extra)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if n == "pos_layer_embed":
            continue  # grads flow, but tiny in magnitude at init
        assert p.grad is not None, n


def stage_grids(model, size):
    grids = []
    hooks = [s.register_forward_hook(lambda m, i, o: grids.append(tuple(o[0].shape[-2:])))
             for s in model.stages()]
    with torch.device("meta"):
        model(torch.empty(1, 3, *size))
    for h in hooks:
        h.remove()
    return grids


def test_cvt_token_grids_match_spec():
    model = meta_model("cvt_13").eval()
    assert stage_grids(model, (224, 224)) == [(56, 56), (28, 28), (14, 14)]
    assert stage_grids(model, (384, 384)) == [(96, 96), (48, 48), (24, 24)]
    assert stage_grids(model, (224, 320)) == [(56, 80), (28, 40), (14, 20)]


def test_cvt_resolution_independence():
    """Same weights, any input size, square or not: no position embedding to interpolate."""
    model = create_model("cvt_13", num_classes=5, **TINY_CVT).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for size in [(64, 64), (96, 96), (64, 96), (97, 131), (33, 45)]:
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batch_of_one_keeps_batch_dim():
    model = create_model("cvt_13", num_classes=5, **TINY_CVT).eval()
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    ceit = create_model("ceit_tiny", num_classes=5, **TINY_CEIT).eval()
    assert ceit(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("name,extra,res", [("cvt_13", TINY_CVT, 48), ("ceit_tiny", TINY_CEIT, 32),
                                            ("cvt_13", {}, 64)])
def test_sdpa_matches_reference_attention(name, extra, res):
    model = create_model(name, num_classes=10, **extra).eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        model.set_attn_impl("reference")
        ref = model(x)
        model.set_attn_impl("sdpa")
        fast = model(x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def _manual_cvt_attention(attn, x, h, w):
    """The official attention (docs/models.md#convolutional-attention) written out with functional
    ops (eval mode)."""
    C = x.shape[-1]
    cls, tokens = x[:, :1], x[:, 1:]
    grid = tokens.transpose(1, 2).reshape(x.shape[0], C, h, w)

    def conv_bn(seq, stride):
        y = F.conv2d(grid, seq.conv.weight, stride=stride, padding=1, groups=C)
        y = F.batch_norm(y, seq.bn.running_mean, seq.bn.running_var, seq.bn.weight, seq.bn.bias,
                         False, 0.0, seq.bn.eps)
        return torch.cat([cls, y.flatten(2).transpose(1, 2)], 1)

    q = F.linear(conv_bn(attn.conv_proj_q, 1), attn.proj_q.weight, attn.proj_q.bias)
    k = F.linear(conv_bn(attn.conv_proj_k, 2), attn.proj_k.weight, attn.proj_k.bias)
    v = F.linear(conv_bn(attn.conv_proj_v, 2), attn.proj_v.weight, attn.proj_v.bias)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], attn.num_heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    a = (torch.einsum("bhlk,bhtk->bhlt", q, k) * C ** -0.5).softmax(-1)
    out = torch.einsum("bhlt,bhtv->bhlv", a, v).permute(0, 2, 1, 3).reshape(x.shape[0], -1, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def test_cvt_attention_follows_the_official_formula():
    """Scale C^-0.5, cls token bypassing conv+BN, k/v at stride 2, (h d) head split."""
    model = create_model("cvt_13", num_classes=3, dims=(16, 32, 96), heads=(1, 2, 3),
                         depths=(1, 1, 1)).eval()
    attn = model.stage2.blocks[0].attn
    for bn in (attn.conv_proj_q.bn, attn.conv_proj_k.bn, attn.conv_proj_v.bn):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    h, w = 5, 7
    x = torch.randn(2, 1 + h * w, 96)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, h, w), _manual_cvt_attention(attn, x, h, w))


def test_cvt_uses_quickgelu_and_fp32_layernorm():
    model = create_model("cvt_13", **TINY_CVT)
    assert isinstance(model.stage0.blocks[0].mlp.act, QuickGELU)
    x = torch.randn(100)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    # Parameters in bf16 as DeepSpeed keeps them: every LayerNorm computes in fp32 and rounds
    # once, so its output is, to the bit, the fp32 computation rounded (a plain bf16 LayerNorm
    # rounds on the way: tens of elements differ here).
    model = model.bfloat16()
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert len(norms) == 12
    gen = torch.Generator().manual_seed(0)
    for name, norm in norms.items():
        width = norm.normalized_shape[0]
        with torch.no_grad():
            norm.weight.copy_(torch.randn(width, generator=gen))
            norm.bias.copy_(torch.randn(width, generator=gen))
        x = (torch.randn(64, 197, width, generator=gen) * 3 + 5).bfloat16()
        expected = F.layer_norm(x.float(), (width,), norm.weight.float(), norm.bias.float(), norm.eps)
        assert torch.equal(norm(x), expected.bfloat16()), name


def test_cvt_drop_path_is_a_per_stage_ramp():
    model = create_model("cvt_13")
    assert all(isinstance(b.drop_path, nn.Identity) for s in (model.stage0, model.stage1) for b in s.blocks)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.stage2.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 10))
    assert isinstance(model.stage2.blocks[0].drop_path, nn.Identity)
    w24 = meta_model("cvt_w24")
    assert w24.stage2.blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    ceit = create_model("ceit_tiny", **TINY_CEIT, drop_path_rate=0.2)
    assert ceit.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_official_init():
    model = create_model("cvt_13", **TINY_CVT)
    lin = model.stage1.blocks[0].attn.proj_q
    assert torch.count_nonzero(lin.bias) == 0 and lin.weight.std() < 0.03
    assert torch.count_nonzero(model.head.bias) > 0  # head bias keeps PyTorch's default
    assert model.stage2.cls_token.abs().sum() > 0  # trunc_normal, not zeros
    conv = model.stage0.patch_embed.proj
    assert torch.count_nonzero(conv.bias) > 0  # conv keeps its default init
    ceit = create_model("ceit_tiny", **TINY_CEIT)
    assert torch.count_nonzero(ceit.pos_layer_embed) == 0
    assert torch.count_nonzero(ceit.head.bias) == 0
    assert torch.count_nonzero(ceit.blocks[0].leff.conv1.bias) > 0


def test_weight_decay_groups_cvt_13():
    """As the official grouping (docs/models.md#weight-decay-groups): 121 decayed tensors
    (19,911,936 params), 221 not (85,544 params)."""
    decay, no_decay = weight_decay_groups(meta_model("cvt_13"), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert (len(decay["params"]), sum(p.numel() for p in decay["params"])) == (121, 19_911_936)
    assert (len(no_decay["params"]), sum(p.numel() for p in no_decay["params"])) == (221, 85_544)


def test_weight_decay_groups_ceit():
    model = create_model("ceit_tiny", **TINY_CEIT)
    decay, no_decay = weight_decay_groups(model, 0.05)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(model.pos_layer_embed) in ids(decay)  # 3-D, decayed (docs/models.md#weight-decay-groups)
    assert {id(model.pos_embed), id(model.cls_token)} <= ids(no_decay)
    assert id(model.blocks[0].leff.conv2.weight) in ids(decay)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


@pytest.mark.parametrize("name,extra,res", [("cvt_13", TINY_CVT, 48), ("ceit_tiny", TINY_CEIT, 32)])
def test_grad_checkpointing_parity(name, extra, res):
    """Same outputs, gradients and BN running statistics with checkpointing on (train mode,
    drop path active)."""
    torch.manual_seed(1)
    ref = create_model(name, num_classes=4, drop_path_rate=0.3, **extra).train()
    ckpt = create_model(name, num_classes=4, drop_path_rate=0.3, **extra).train()
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, res, res)
    outs = []
    for model in (ref, ckpt):
        torch.manual_seed(2)
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (n, p), (_, q) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)
    for (n, b), (_, c) in zip(ref.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(c, b, msg=n)


def test_ceit_leff_passes_the_normed_class_token_and_lca_is_last_row():
    model = create_model("ceit_tiny", **TINY_CEIT).eval()
    leff = model.blocks[0].leff
    x = torch.randn(2, 1 + 8 * 8, 32)
    torch.testing.assert_close(leff(x)[:, 0], x[:, 0])
    # LCA attention == the last row of full self-attention over the layer class tokens.
    lca = model.lca.attn
    c = torch.randn(2, 3, 32)
    q, k, v = lca._qkv(c)
    full = torch.softmax(q @ k.transpose(-2, -1) * lca.scale, -1) @ v
    full = lca.proj(full.transpose(1, 2).reshape(2, 3, 32))
    torch.testing.assert_close(lca(c), full[:, -1:])


def test_ceit_rejects_other_input_sizes():
    model = create_model("ceit_tiny", **TINY_CEIT)
    with pytest.raises(ValueError, match="built for 32x32 input got \\(64, 64\\)"):
        model(torch.randn(1, 3, 64, 64))


def test_resize_pos_embed():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_pos_embed(pos, 24)
    assert out.shape == (1, 577, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 576, 8))
    assert resize_pos_embed(pos, 14) is pos
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed(torch.randn(1, 1 + 10, 8), 4)


def test_backbone_interface():
    for model, res in [(create_model("cvt_13", **TINY_CVT), 48), (create_model("ceit_tiny", **TINY_CEIT), 32)]:
        model.eval()
        x = torch.randn(2, 3, res, res)
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features)
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(21)
        assert model(x).shape == (2, 21) and model.get_classifier().out_features == 21
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


def test_eval_metadata():
    cvt = create_model("cvt_13", **TINY_CVT)
    c224, c384 = eval_config(cvt, 224), eval_config(cvt, 384)
    assert (c224.crop_pct, c224.crop_mode, c224.resize_size, c224.interpolation) == (0.875, "center", 256, "bicubic")
    assert (c384.crop_pct, c384.crop_mode, c384.resize_size) == (1.0, "squash", 384)
    assert c224.mean == (0.485, 0.456, 0.406) and c224.std == (0.229, 0.224, 0.225)
    ceit = meta_model("ceit_small_384")
    assert eval_config(ceit).input_size == 384 and eval_config(ceit).resize_size == 438
    with pytest.raises(ValueError, match="no evaluation metadata at 384"):
        eval_config(meta_model("ceit_tiny"), 384)
    assert isinstance(cvt, CvT) and isinstance(ceit, CeiT)


def test_batchnorm_stays_fp32_under_bf16_parameters():
    """DeepSpeed bf16 casts parameters, not buffers: BN must take bf16 input and weights while its
    statistics stay fp32 (a plain BatchNorm2d raises on CPU)."""
    from cvtkit.models.layers import BatchNorm2dFp32
    ref, bn = nn.BatchNorm2d(8), BatchNorm2dFp32(8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), bn.parameters()):  # bf16-exact values in both
            p.copy_(torch.randn(8, generator=gen).bfloat16())
            q.copy_(p)
    x = torch.randn(4, 8, 5, 5, generator=gen) * 2 + 3
    assert torch.equal(bn(x), ref(x))  # fp32: the plain module's behaviour
    for p in bn.parameters():
        p.data = p.data.bfloat16()
    before = bn.running_mean.clone()
    out = bn(x.bfloat16())
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    assert not torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 2
    # computed in fp32, rounded once: to the bit (computing in bf16 moves hundreds of these
    # elements by up to 0.03, which a tolerance of 0.05 did not see)
    assert torch.equal(out, ref(x.bfloat16().float()).bfloat16())
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
    bn.bfloat16()
    assert bn.running_var.dtype == torch.float32 and bn.weight.dtype == torch.bfloat16
    model = create_model("cvt_13", num_classes=3, **TINY_CVT).eval()
    for p in model.parameters():
        p.data = p.data.bfloat16()
    assert model(torch.randn(2, 3, 48, 48).bfloat16()).dtype == torch.bfloat16


def test_drop_path_draws_as_timms():
    """Ours (kept out of timm's import) drops and scales the same samples with the same draws."""
    from timm.layers import DropPath as TimmDropPath

    from cvtkit.models.layers import DropPath
    x = torch.randn(64, 5, 8)
    ours, theirs = DropPath(0.3), TimmDropPath(0.3)
    outputs = {}
    for train in (True, False):
        ours.train(train), theirs.train(train)
        torch.manual_seed(1)
        expected = theirs(x)
        torch.manual_seed(1)
        outputs[train] = ours(x)
        assert torch.equal(outputs[train], expected)
    kept = outputs[True].flatten(1).any(1)
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(outputs[True][kept], x[kept] / 0.7)  # the kept ones scaled by 1 / keep
    assert torch.equal(outputs[False], x) and ours.extra_repr() == theirs.extra_repr()
