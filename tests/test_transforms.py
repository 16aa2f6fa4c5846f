"""Recipe transforms: shapes, value ranges, and the exact official evaluation pipelines."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from cvtkit.config_loader import ConfigError, load_config
from cvtkit.data.transforms import (AugmentConfig, build_mixup, eval_transform, normalize_on_device,
                                    train_transform)
from cvtkit.models import create_model, eval_config
from cvtkit.models.factory import CENTER_224, IMAGENET_MEAN, IMAGENET_STD, SQUASH_384


def photo(w=400, h=300, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_224_is_resize_256_then_center_crop_224():
    img = photo(400, 300)
    out = eval_transform(CENTER_224)(img)
    expected = TF.center_crop(TF.resize(img, 256, interpolation=TF.InterpolationMode.BICUBIC), 224)
    expected = TF.normalize(TF.to_tensor(expected), IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, expected)


def test_eval_384_is_a_square_warp_without_crop():
    img = photo(500, 200)
    out = eval_transform(SQUASH_384, normalize=False)(img)
    expected = TF.pil_to_tensor(TF.resize(img, [384, 384], interpolation=TF.InterpolationMode.BICUBIC))
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    cvt = create_model("cvt_13", dims=(16, 32, 64), heads=(1, 2, 2), depths=(1, 1, 1))
    assert eval_transform(eval_config(cvt, 384))(img).shape == (3, 384, 384)


def test_deit_train_transform_has_the_recipe():
    cfg = AugmentConfig()
    tf = train_transform(cfg, 64)
    names = " ".join(type(t).__name__ for t in tf.transforms)
    assert "RandomResizedCropAndInterpolation" in names and "RandAugment" in names
    assert "RandomErasing" in names and "Normalize" in names
    rrc = tf.transforms[0]
    assert rrc.scale == (0.08, 1.0) and "bicubic" in str(rrc.interpolation).lower()
    torch.manual_seed(0)
    out = torch.stack([tf(photo(seed=i)) for i in range(8)])
    assert out.shape == (8, 3, 64, 64) and out.dtype == torch.float32
    assert -1 < out.mean() < 1 and out.std() > 0.3  # normalised; erasing adds N(0, 1) noise
    torch.manual_seed(0)
    plain = train_transform(AugmentConfig(re_prob=0.0, auto_augment=None), 64)(photo())
    assert -2.12 <= plain.min() < 0 < plain.max() <= 2.65  # (0 - mean) / std .. (1 - mean) / std
    raw = train_transform(cfg, 64, normalize=False)(photo())
    assert raw.shape[-2:] == (64, 64) and raw.dtype == torch.uint8


def test_finetune_transform_resizes_then_random_crops():
    tf = train_transform(AugmentConfig(kind="finetune"), 96)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:3] == ["Resize", "RandomCrop", "RandomHorizontalFlip"]
    assert tf.transforms[0].size == (128, 128)
    assert tf(photo(300, 500)).shape == (3, 96, 96)


def test_mixup_gives_smoothed_soft_targets():
    mixup = build_mixup(AugmentConfig(), num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    mixed, soft = mixup(x, y)
    assert soft.shape == (4, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    assert soft.min() >= 0.1 / 10 - 1e-6  # label smoothing 0.1 spreads mass to every class
    assert build_mixup(AugmentConfig(mixup_alpha=0, cutmix_alpha=0), 10) is None


def test_normalize_on_device_matches_cpu_normalize():
    img = photo(64, 64)
    u8 = TF.pil_to_tensor(img).unsqueeze(0)
    expected = TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)
    torch.testing.assert_close(normalize_on_device(u8), expected, atol=1e-5, rtol=1e-5)


def test_augment_config_is_validated(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text("kind: deit\nscale: [0.5, 0.2]\n")
    with pytest.raises(ConfigError, match="scale: expected 0 < min <= max <= 1"):
        load_config(AugmentConfig, path)
    path.write_text("kind: random\n")
    with pytest.raises(ConfigError, match="kind: expected one of 'deit', 'finetune', 'none'"):
        load_config(AugmentConfig, path)


def test_deit_recipe_survives_its_strongest_ops():
    """RandAugment `rand-m9-mstd0.5-inc1` can posterize to 0 bits (needs Pillow < 12), and
    magnitude noise reaches every op's extremes: run many images through it."""
    from timm.data.auto_augment import posterize
    assert posterize(photo(8, 8), 0).getpixel((0, 0)) == (0, 0, 0)
    tf = train_transform(AugmentConfig(), 24)
    torch.manual_seed(0)
    for i in range(300):
        assert tf(photo(40, 30, seed=i)).shape == (3, 24, 24)
