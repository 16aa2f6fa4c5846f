"""RandAugment on the device (`data.augment.randaugment_on: device`) is timm's `rand-m9-mstd0.5-inc1`:
- each op, at several magnitudes and both signs, on real photographs (scikit-learn's two), against
  timm's own PIL op;
- a batch of samples with mixed draws against timm's RandAugment under the same per-sample seeds;
- the op choice and the magnitudes over 20,000 draws (seeded as the loader seeds each sample)
  against timm's own sampling, with the checks' power shown on wrong distributions;
- through the loader: the same batches as RandAugment on the CPU, and an exact mid-epoch resume;
- a short training on the demo's digits reaches the same accuracy with either setting (slow).
"""
import copy
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency, ks_2samp
from timm.data.auto_augment import _LEVEL_DENOM

from cvtkit.config_loader import ConfigError, load_config
from cvtkit.data.randaugment_device import DeviceRandAugment, RandAugmentDraws, RandAugmented
from cvtkit.data.transforms import AugmentConfig, timm_randaugment
from cvtkit.data.wds_loader import _sample_seed
from cvtkit.rng import seed_host
from cvtkit.train.run_config import RunConfig
from helpers import TINY_CONFIG

RECIPE = AugmentConfig(randaugment_on="device")
RA = timm_randaugment(RECIPE, 224)
DEVICE_RA = DeviceRandAugment(RA)
OPS = [op.name for op in RA.ops]
DRAWS = 20_000
# The largest difference from PIL allowed per op, in grey levels, and the share of pixels that may
# show it. Lookup-table ops are integer arithmetic: exact. Blends and warps reproduce PIL's float
# arithmetic and are exact here (measured 0); a platform whose PIL build fuses a multiply-add
# could round a value sitting on a truncation boundary the other way: 1 level, on a few pixels.
EXACT, FLOAT = (0, 0.0), (1, 1e-3)
BOUND = {name: (FLOAT if name.startswith(("Color", "Sharpness", "Rotate", "Shear", "Translate")) else EXACT)
         for name in OPS}
MAGNITUDES = (0.5, 3.0, 6.5, 9.0, 10.0)


def photos(size=(120, 90)) -> list[Image.Image]:
    """scikit-learn's two photographs, resized small for speed (not square: width and height must
    not swap)."""
    from sklearn.datasets import load_sample_image
    return [Image.fromarray(load_sample_image(n)).resize(size, Image.BICUBIC) for n in ("china.jpg", "flower.jpg")]


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])


def seed_with_sign(negative: bool) -> int:
    """A seed after which timm's `_randomly_negate` (`random.random() > 0.5`) negates the level,
    or keeps it."""
    for seed in range(100):
        if (random.Random(seed).random() > 0.5) == negative:
            return seed
    raise AssertionError("no seed of either sign in 100")


# Every op of the recipe, and the affine ops again with bilinear interpolation (`interpolation:
# bilinear` in the config), which timm passes to its warps instead of bicubic.
BILINEAR = timm_randaugment(dataclasses.replace(RECIPE, interpolation="bilinear"), 224)
CASES = [(RA, i) for i in range(len(OPS))] + [(BILINEAR, i) for i, n in enumerate(OPS)
                                             if n.startswith(("Rotate", "Shear", "Translate"))]


@pytest.mark.parametrize("ra,index", CASES, ids=[OPS[i] + ("" if ra is RA else "-bilinear") for ra, i in CASES])
def test_each_op_matches_timms_pil_op_at_several_magnitudes(ra, index):
    op = ra.ops[index]
    device_ra = DeviceRandAugment(ra)
    images = photos()
    batch = as_batch(images)
    max_diff, max_share = BOUND[op.name]
    for magnitude in MAGNITUDES:
        for negative in (False, True):
            random.seed(seed_with_sign(negative))
            args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
            theirs = as_batch([op.aug_fn(img, *args, **op.kwargs) for img in images])
            draws = torch.full((len(images), ra.num_layers, 2), -1.0, dtype=torch.float64)
            draws[:, 0] = torch.tensor([index, args[0] if args else 0.0], dtype=torch.float64)
            ours = device_ra(batch, draws)
            diff = (ours.int() - theirs.int()).abs()
            where = f"{op.name} at magnitude {magnitude}, argument {args}"
            assert diff.float().mean() <= 1, where
            assert diff.max() <= max_diff and (diff > 0).float().mean() <= max_share, where


def apply_alone(op_name: str, images: torch.Tensor, arg: float = 0.0) -> torch.Tensor:
    """The device's op `op_name` on every image of the batch, as the first layer's draw."""
    draws = torch.full((len(images), RA.num_layers, 2), -1.0, dtype=torch.float64)
    draws[:, 0] = torch.tensor([OPS.index(op_name), arg], dtype=torch.float64)
    return DEVICE_RA(images, draws)


def test_autocontrast_and_equalize_match_pil_on_every_level_range():
    """The tables from per-sample histograms, beyond two photographs: autocontrast for every
    (darkest, brightest) pair of levels with every level between present; equalize on 1,000
    random few-level images (one level, a zero step, and every size of the last level's count)."""
    pairs = [(lo, hi) for lo in range(256) for hi in range(lo + 1, 256)] + [(7, 7)]
    pairs += [pairs[0]] * (-len(pairs) % 3)
    ramps = np.stack([np.linspace(lo, hi, 256).round() for lo, hi in pairs]).astype(np.uint8)
    ramps = torch.from_numpy(ramps).view(-1, 3, 1, 256)  # three pairs an image, one a channel
    check_against_pil("AutoContrast", ramps)
    rng = np.random.default_rng(0)
    few = []
    for _ in range(1000):
        levels = rng.choice(256, size=rng.integers(1, 9), replace=False)
        few.append(rng.choice(levels, size=(3, 64, 64), p=rng.dirichlet(np.ones(len(levels)) * 0.3)))
    check_against_pil("Equalize", torch.from_numpy(np.stack(few).astype(np.uint8)))


def check_against_pil(op_name: str, images: torch.Tensor) -> None:
    op = RA.ops[OPS.index(op_name)]
    theirs = as_batch([op.aug_fn(Image.fromarray(i.permute(1, 2, 0).numpy()), **op.kwargs) for i in images])
    assert torch.equal(apply_alone(op_name, images), theirs)


def test_a_batch_of_mixed_draws_equals_timms_randaugment_per_sample():
    """32 crops of the photographs, each with its own seed: the device's batch (ops grouped
    across samples, two layers) equals timm's RandAugment applied to each image alone under the
    same seed, so the draws are timm's own for that seed."""
    crops = [img.crop((x, y, x + 48, y + 40)) for img in photos((120, 90)) for x, y in
             [(5 * k, 3 * k) for k in range(16)]]
    draw = RandAugmentDraws(RA)
    draws, theirs = [], []
    for i, img in enumerate(crops):
        seed_host(_sample_seed(f"3:0:1:{i}"))
        draws.append(draw())
        seed_host(_sample_seed(f"3:0:1:{i}"))
        theirs.append(RA(img))
    draws = torch.stack(draws)
    applied = draws[:, :, 0]
    assert (applied[:, 1] >= 0).sum() >= 4 and len(set(applied[applied >= 0].long().tolist())) >= 8
    assert torch.equal(DEVICE_RA(as_batch(crops), draws), as_batch(theirs))


def timms_sampling(ra, n: int, seed: int) -> list[list[tuple[int, float]]]:
    """What timm's RandAugment itself passes to its op functions over `n` images (a tiny image
    each, the ops really run), from one seeded stream as in a timm worker."""
    spied, record = copy.copy(ra), []
    spied.ops = []
    for index, op in enumerate(ra.ops):
        op = copy.copy(op)

        def spy(img, *args, real=op.aug_fn, index=index, **kwargs):
            record[-1].append((index, float(args[0]) if args else 0.0))
            return real(img, *args, **kwargs)
        op.aug_fn = spy
        spied.ops.append(op)
    random.seed(seed)
    np.random.seed(seed)
    tiny = Image.new("RGB", (8, 8), (90, 120, 150))
    for _ in range(n):
        record.append([])
        spied(tiny)
    return record


def clipped_arguments(op) -> set[float]:
    """The op's arguments (both signs) at timm's upper bound on the magnitude."""
    bound = op.magnitude_max or _LEVEL_DENOM
    args = set()
    for negative in (False, True):
        random.seed(seed_with_sign(negative))
        args.add(float(op.level_fn(bound, op.hparams)[0]) if op.level_fn is not None else 0.0)
    return args


CLIPPED = {op.name: clipped_arguments(op) for op in RA.ops}


def our_sampling(ra, n: int, seed: int) -> list[list[tuple[int, float]]]:
    """The device path's draws for `n` samples, each seeded as the loader seeds it."""
    draw, out = RandAugmentDraws(ra), []
    for i in range(n):
        seed_host(_sample_seed(f"{seed}:0:{i % 8}:{i}"))
        out.append([(int(o), a) for o, a in draw().tolist() if o >= 0])
    return out


def distribution_failures(ours, theirs, threshold=1e-3) -> list[str]:
    """The features whose distributions differ: how many ops an image gets (chi-squared), which
    ops (chi-squared over the 15), each op's argument (two-sample Kolmogorov-Smirnov) and its
    share at the clipped magnitude (an atom: some 2% of the draws, chi-squared)."""
    failures = []
    counts = [[sum(len(d) == k for d in s) for k in range(RA.num_layers + 1)] for s in (ours, theirs)]
    if chi2_contingency(counts).pvalue < threshold:
        failures.append("ops per image")
    flat = [[op for d in s for op in d] for s in (ours, theirs)]
    if chi2_contingency([[sum(o == k for o, _ in f) for k in range(len(OPS))] for f in flat]).pvalue < threshold:
        failures.append("op choice")
    for k, name in enumerate(OPS):
        a, b = ([x for o, x in f if o == k] for f in flat)
        if len(set(a + b)) > 1 and ks_2samp(a, b).pvalue < threshold:
            failures.append(name)
        at_clip = [sum(x in CLIPPED[name] for x in v) for v in (a, b)]
        if 0 < sum(at_clip) < len(a) + len(b) and chi2_contingency(
                [[at_clip[0], len(a) - at_clip[0]], [at_clip[1], len(b) - at_clip[1]]]).pvalue < threshold:
            failures.append(f"{name} at the clip")
    return failures


@pytest.fixture(scope="module")
def timm_draws():
    return timms_sampling(RA, DRAWS, seed=1)


def test_op_choice_and_magnitudes_follow_timms_sampling(timm_draws):
    ours = our_sampling(RA, DRAWS, seed=2)
    assert distribution_failures(ours, timm_draws) == []
    # Magnitude noise really is there: rotate's angle takes many values around 27 degrees.
    rotate = [abs(a) for d in ours for o, a in d if OPS[o] == "Rotate"]
    assert len(set(rotate)) > 100 and 26 < np.mean(rotate) < 28 and max(rotate) == 30.0


def test_wrong_distributions_would_be_caught(timm_draws):
    """The checks' power: no magnitude noise (`mstd0`), both ops always applied (as DALI does),
    or the magnitude clipped at 11 instead of timm's 10 (`mmax11`)."""
    def ra_of(spec):
        return timm_randaugment(AugmentConfig(auto_augment=spec, randaugment_on="device"), 224)
    no_noise = distribution_failures(our_sampling(ra_of("rand-m9-mstd0-inc1"), DRAWS, seed=2), timm_draws)
    assert {"Rotate", "ShearX", "TranslateXRel", "ColorIncreasing"} <= set(no_noise)
    always = distribution_failures(our_sampling(ra_of("rand-m9-mstd0.5-inc1-p1.0"), DRAWS, seed=2), timm_draws)
    assert "ops per image" in always
    unclipped = distribution_failures(our_sampling(ra_of("rand-m9-mstd0.5-inc1-mmax11"), DRAWS, seed=2), timm_draws)
    assert {"Rotate at the clip", "ShearX at the clip", "TranslateXRel at the clip"} <= set(unclipped)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """24 photo-like JPEGs in 3 shards (the loader benchmark's synthetic photographs)."""
    from cvtkit.bench.loaders import make_photos
    from cvtkit.prep.pipeline import PrepOptions, run
    root = tmp_path_factory.mktemp("photos")
    src = make_photos(root / "src", 24, classes=3)
    run(PrepOptions(source=str(src), out=str(root / "wds"), holdout=0, shard_samples=8, workers=1), progress=False)
    return str(root / "wds")


def loader(shards, augment, workers=2):
    from cvtkit.data.transforms import train_decoder
    from cvtkit.data.wds_loader import WdsLoader
    from cvtkit.shards import ShardSet
    return WdsLoader(ShardSet.from_info(shards, "train"), 4, workers=workers, seed=5,
                     transform=train_decoder(augment, 48), shuffle_buffer=16)


def test_the_loader_gives_the_same_batches_as_randaugment_on_the_cpu_and_resumes_exactly(photo_shards):
    """Per sample, the workers draw right after the flip, where timm's RandAugment draws on the
    CPU: the device's batches are the CPU's, pixel for pixel; a loader resumed mid-epoch hands
    over the same images and draws as an uninterrupted one."""
    from cvtkit.data.device_batch import DeviceBatch
    on_cpu = list(loader(photo_shards, AugmentConfig()))
    on_device = list(loader(photo_shards, RECIPE))
    # No erasing or mixing (their random draws would differ between the calls): RandAugment alone.
    plain = dataclasses.replace(RECIPE, re_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    prep = DeviceBatch(plain, 3, torch.device("cpu"), torch.float32, channels_last=False)
    for (images, labels), (drawn, labels2) in zip(on_cpu, on_device):
        assert isinstance(drawn, RandAugmented) and drawn.draws.shape == (4, 2, 2)
        assert torch.equal(labels, labels2)
        assert torch.equal(prep(drawn, labels)[0], prep(images, labels)[0])
    assert sum(not torch.equal(d.images, c[0]) for c, (d, _) in zip(on_cpu, on_device)) >= 4
    first = loader(photo_shards, RECIPE)
    head = [b for _, b in zip(range(2), first)]
    second = loader(photo_shards, RECIPE)
    second.load_state_dict(first.state_dict())
    for (got, y), (want, wy) in zip(head + list(second), on_device):
        assert torch.equal(got.images, want.images) and torch.equal(got.draws, want.draws) and torch.equal(y, wy)


def test_the_setting_is_checked(tmp_path):
    def error(*overrides):
        with pytest.raises(ConfigError) as info:
            load_config(RunConfig, TINY_CONFIG, ["data.train=x", *overrides])
        return str(info.value)
    assert "data.augment.randaugment_on: expected cpu unless kind is deit" in error(
        "data.augment.randaugment_on=device")
    deit = ["data.augment.kind=deit", "data.augment.randaugment_on=device"]
    assert "data.format: expected wds with augment.randaugment_on: device, got 'ffcv'" in error(
        *deit, "data.format=ffcv")
    assert "data.augment.auto_augment: expected no op the device lacks" in error(
        *deit, "data.augment.auto_augment=rand-m9-mstd0.5-t3a")
    assert load_config(RunConfig, TINY_CONFIG, ["data.train=x", *deit]).data.augment.randaugment_on == "device"


@pytest.mark.slow
def test_training_reaches_the_same_accuracy_with_randaugment_on_the_device(tmp_path):
    """The demo's digits, the DeiT recipe's crop, flip and RandAugment, one process: with the same
    seed, RandAugment on the device trains the very same run as on the CPU (every loss equal);
    its accuracy is within the difference two seeds make on the CPU. About 45 s a run here (6
    epochs of 890 digits at 32 px: 78 steps)."""
    from cvtkit.demo import build_sources
    from cvtkit.prep.pipeline import PrepOptions, run
    from helpers import metrics, train, train_losses
    src, _ = build_sources(tmp_path / "src")
    shards = tmp_path / "shards"
    run(PrepOptions(source=str(src), out=str(shards), holdout=10, shard_samples=200, workers=1), progress=False)
    config = Path(__file__).resolve().parents[1] / "configs/pretrain/demo_digits.yaml"
    runs = {}
    for name, seed, where in (("cpu0", 0, "cpu"), ("device0", 0, "device"), ("cpu1", 1, "cpu")):
        overrides = [f"engine.seed={seed}", "name=run", "schedule.epochs=6", "log.every_steps=1",
                     "data.augment.kind=deit", "data.augment.scale=[0.5,1.0]",
                     f"data.augment.randaugment_on={where}"]
        codes, out = train(tmp_path / name, str(shards), overrides, nproc=1, config=config, timeout=900)
        assert codes == [0], out
        last = [m["val/top1"] for m in metrics(tmp_path / name / "run") if "val/top1" in m][-1]
        runs[name] = (train_losses(tmp_path / name / "run"), last)
    top1 = {name: run[1] for name, run in runs.items()}
    assert runs["device0"][0] == runs["cpu0"][0] and len(runs["cpu0"][0]) >= 60, top1
    assert runs["cpu0"][0] != runs["cpu1"][0]
    assert abs(top1["device0"] - top1["cpu0"]) <= abs(top1["cpu0"] - top1["cpu1"]), top1
    assert min(top1.values()) >= 50, top1  # it learned: chance is 10%
