"""The webdataset loader with simulated ranks: balance, coverage, determinism, resume."""
import io
import itertools
import logging
import random
from pathlib import Path

import pytest
import torch

from cvtkit.prep.pipeline import PrepOptions, run
from cvtkit.data.transforms import eval_transform
from cvtkit.shards import ShardFolderError
from cvtkit.data.wds_loader import WdsLoader, slot_plan
from cvtkit.shards import ShardSet
from cvtkit.models.factory import EvalConfig

import fake_imagenet as fake
from fake_imagenet import damage


def make_shards(root, shard_samples):
    src = fake.make_imagenet1k(root / "in1k")
    run(PrepOptions(source=str(src), out=str(root / "out"), shard_samples=shard_samples, workers=1),
        progress=False)
    return str(root / "out")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 train samples in uneven shards of 7 (7,7,7,7,7,5); 12 validation samples."""
    return make_shards(tmp_path_factory.mktemp("wds"), 7)


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory):
    """40 train samples in 8 shards of 5; 12 validation samples."""
    return make_shards(tmp_path_factory.mktemp("even"), 5)


def keys_of(loader, limit=None):
    """Keys of each batch; with `limit`, exactly that many batches are taken."""
    return [list(keys) for _, _, keys in itertools.islice(loader, limit)]


def all_keys(folder, split):
    return {k for b in keys_of(WdsLoader(ShardSet.from_info(folder, split), 4, train=False, workers=0,
                                         with_keys=True)) for k in b}


def test_slot_plan_covers_every_sample_once():
    for shards, slots in [(6, 4), (2, 6), (3, 4), (5, 5), (1, 3)]:
        seen = {}
        for slot in range(slots):
            ids, stride, phase = slot_plan(shards, slots, slot)
            assert ids, "no slot is ever empty"
            for shard in ids:
                for sample in range(stride * 3):
                    if sample % stride == phase:
                        seen[(shard, sample)] = seen.get((shard, sample), 0) + 1
        assert all(v == 1 for v in seen.values()) and {s for s, _ in seen} == set(range(shards))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 3), (4, 0)])
def test_eval_loader_sees_every_sample_exactly_once(shards, world, workers):
    keys = []
    for rank in range(world):
        loader = WdsLoader(ShardSet.from_info(shards, "validation"), 4, rank, world, workers,
                           train=False, with_keys=True)
        keys += [k for b in keys_of(loader) for k in b]
    assert len(keys) == 12 and set(keys) == all_keys(shards, "validation")


@pytest.mark.parametrize("world", [2, 3])
def test_train_batches_are_equal_across_ranks_and_workers(shards, world):
    counts = set()
    for workers in (0, 2, 3):
        for rank in range(world):
            loader = WdsLoader(ShardSet.from_info(shards, "train"), 4, rank, world, workers, with_keys=True)
            batches = keys_of(loader)
            assert all(len(b) == 4 for b in batches)
            counts.add((len(batches), len(loader)))
    assert counts == {(40 // (world * 4),) * 2}


def test_train_epoch_is_disjoint_and_complete_when_shards_balance(even_shards):
    keys = []
    for rank in range(2):
        loader = WdsLoader(ShardSet.from_info(even_shards, "train"), 5, rank, 2, workers=2, with_keys=True)
        keys += [k for b in keys_of(loader) for k in b]
    assert len(keys) == 40 and set(keys) == all_keys(even_shards, "train")


def test_order_is_seeded_and_changes_by_epoch(shards):
    def epoch_keys(seed, epoch):
        loader = WdsLoader(ShardSet.from_info(shards, "train"), 4, 0, 2, workers=2, seed=seed, with_keys=True)
        loader.set_epoch(epoch)
        return keys_of(loader)
    assert epoch_keys(0, 0) == epoch_keys(0, 0)
    assert epoch_keys(0, 0) != epoch_keys(0, 1) and epoch_keys(0, 0) != epoch_keys(1, 0)


@pytest.mark.parametrize("workers,stop", [(0, 2), (2, 3), (3, 4)])
def test_resume_mid_epoch_continues_without_repeats_or_gaps(shards, workers, stop):
    def make():
        return WdsLoader(ShardSet.from_info(shards, "train"), 4, 0, 1, workers, seed=3, with_keys=True)
    reference = keys_of(make())
    first = make()
    head = keys_of(first, limit=stop)
    state = first.state_dict()
    assert state["batches_done"] == stop and first.samples_delivered == stop * 4
    second = make()
    second.load_state_dict(state)
    tail = keys_of(second)
    assert head + tail == reference
    assert second.epoch == 1 and second.batches_done == 0  # the epoch ended normally


def global_steps(shards, world, workers, global_batch=16, micro=4, state=None, steps=None, slots=0):
    """The key lists of each micro-batch of each global step, rank by rank, from `state` on; and
    the state after `steps` steps (None: to the end of the epoch)."""
    accum = global_batch // micro // world
    loaders = [WdsLoader(ShardSet.from_info(shards, "train"), micro, rank, world, workers, seed=3,
                         with_keys=True, global_batch=global_batch, slots=slots) for rank in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    limit = None if steps is None else steps * accum
    per_rank = [keys_of(loader, limit) for loader in loaders]
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states), "the position is the same on every rank"
    return [[b for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum]]
            for s in range(len(per_rank[0]) // accum)], states[0]


def test_order_does_not_depend_on_world_size_or_workers(shards):
    """Each global step's micro-batches hold the same samples on 1, 2 or 4 ranks, with any workers."""
    reference, _ = global_steps(shards, 1, 0)
    assert len(reference) == 40 // 16 and all(len(step) == 4 for step in reference)
    for world, workers in [(2, 0), (4, 2), (2, 3), (1, 2)]:
        assert global_steps(shards, world, workers)[0] == reference, (world, workers)


@pytest.mark.parametrize("stop", [1, 5, 6, 7])
def test_resume_on_other_world_sizes_continues_the_same_steps(shards, stop):
    """4 ranks stopped after `stop` steps (epochs of 2 steps: mid-epoch; one step before, at and
    one after the boundary at step 6), resumed on 2, stopped a step later, resumed on 1 (other
    workers each time): the steps of an uninterrupted run on 1 rank, the next epochs' included."""
    def epochs(world, workers, state, count):
        steps = []
        for _ in range(count):
            more, state = global_steps(shards, world, workers, state=state)
            steps += more
        return steps, state
    reference, _ = epochs(1, 0, None, 5)
    head = []
    state = None
    while len(head) < stop:  # across epochs, as the trainer's endless iteration
        more, state = global_steps(shards, 4, 2, state=state, steps=min(stop - len(head), 2))
        head += more
    middle, state = global_steps(shards, 2, 0, state=state, steps=1)
    if not middle:  # stopped at the end of an epoch: the next step is the next epoch's first
        middle, state = global_steps(shards, 2, 0, state=state, steps=1)
    tail, _ = epochs(1, 3, state, 2)
    assert (head + middle + tail)[:len(reference)] == reference[:len(head + middle + tail)]
    assert len(head + middle + tail) > stop + 1


def test_a_whole_epoch_sees_every_sample_exactly_once(tmp_path):
    """48 samples in 12 shards of 4, global batch 12: on 3 ranks and on 1, with one or two shards
    per slot, every training sample once per epoch, none lost."""
    from helpers import make_tiny_shards
    folder = make_tiny_shards(tmp_path, per_class=12, shard_samples=4)
    everything = all_keys(folder, "train")
    assert len(everything) == 48
    for world, slots in [(3, 0), (1, 0), (3, 6)]:
        steps, state = global_steps(folder, world, 0, global_batch=12, micro=4, slots=slots)
        keys = [k for step in steps for batch in step for k in batch]
        assert len(keys) == 48 and set(keys) == everything, (world, slots)
        assert state["epoch"] == 1 and state["slots"] == (slots or 12)


def test_a_world_size_that_cannot_keep_the_order_is_refused(shards):
    from cvtkit.config_loader import ConfigError
    from cvtkit.data.wds_loader import LoaderStateError
    with pytest.raises(ConfigError, match="3 ranks cannot serve the 4 micro-batches of 4 of each global "
                                          "batch of 16 in the same order; the world sizes that can: 1, 2, 4$"):
        WdsLoader(ShardSet.from_info(shards, "train"), 4, 0, 3, 0, global_batch=16)
    with pytest.raises(ConfigError, match="data.slots=6: .* divides 16 and is a multiple of 4"):
        WdsLoader(ShardSet.from_info(shards, "train"), 4, 0, 1, 0, global_batch=16, slots=6)
    _, state = global_steps(shards, 2, 0, steps=1)
    loader = WdsLoader(ShardSet.from_info(shards, "train"), 4, 0, 1, 0, global_batch=16, slots=8)
    with pytest.raises(LoaderStateError, match="the checkpoint's sample order has 4 slots"):
        loader.load_state_dict(state)


def test_batches_carry_transformed_images(shards):
    loader = WdsLoader(ShardSet.from_info(shards, "validation"), 4, train=False, workers=0,
                       transform=eval_transform(EvalConfig(32, 0.875, "center")))
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 4


def test_bad_shard_sets_fail_clearly(shards, tmp_path):
    with pytest.raises(ShardFolderError, match="no _info.json"):
        ShardSet.from_info(str(tmp_path), "train")
    with pytest.raises(ShardFolderError, match="no split 'test'"):
        ShardSet.from_info(shards, "test")
    with pytest.raises(ShardFolderError, match="cannot give one global batch of 128"):
        WdsLoader(ShardSet.from_info(shards, "train"), 64, 0, 2)


def test_reduced_size_decoding_keeps_what_the_transform_needs():
    import io
    import random

    from cvtkit.data.transforms import AugmentConfig, min_decode_side
    from cvtkit.data.wds_loader import _decode
    from cvtkit.models.factory import CENTER_224, SQUASH_384

    raw = fake.jpeg(random.Random(0), size=(1200, 900))
    sample = {"jpg": raw, "cls": b"3", "__key__": "k"}
    assert _decode(sample)[0].size == (1200, 900)
    img, label, key = _decode(sample, min_decode_side(224, eval_cfg=CENTER_224))
    assert img.size == (600, 450) and label == 3  # 1/2 scale keeps 450 >= 256
    assert min(_decode(sample, min_decode_side(384, eval_cfg=SQUASH_384))[0].size) >= 384
    # RandomResizedCrop's smallest crop (8% area, aspect 3:4) must still hold 224 pixels.
    assert min_decode_side(224, AugmentConfig()) == 915
    assert _decode(sample, 915)[0].size == (1200, 900)
    assert min_decode_side(384, AugmentConfig(kind="finetune")) == 416
    png = io.BytesIO()
    __import__("PIL.Image").Image.new("RGB", (800, 800)).save(png, "PNG")
    assert _decode({"jpg": png.getvalue(), "cls": b"0", "__key__": "p"}, 100)[0].size == (800, 800)


@pytest.mark.slow
def test_loader_benchmark_prints_its_table(capsys):
    from cvtkit.bench.loaders import main as bench_main
    bench_main(["--images", "32", "--repeats", "1", "--workers", "1", "--size", "32", "--batch-size", "8",
                "--device-batch", "8", "--device-size", "32"])
    out = capsys.readouterr().out
    for row in ("ImageFolder + timm DeiT", "ImageFolder + timm RRC + flip", "WdsLoader DeiT (from JPEG bytes)",
                "WdsLoader DeiT, RandAugment on device", "FfcvLoader RRC + flip", "DaliLoader DeiT (CPU operators)"):
        assert f"| {row}" in out, row
    assert "per core" in out and "x ImageFolder" in out
    assert "| WdsLoader DeiT, RandAugment on device | 8 | 32 | CPU" in out  # the device half's row


def test_shards_over_http(shards):
    """Shards served by a local HTTP server (loopback only) read like local ones."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=shards)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = ShardSet.from_info(url, "validation")
        assert remote.urls[0].startswith(url) and remote.num_samples == 12
        keys = [k for b in keys_of(WdsLoader(remote, 4, train=False, workers=0, with_keys=True)) for k in b]
        assert set(keys) == all_keys(shards, "validation")
        with pytest.raises(ShardFolderError, match="nowhere/_info.json: cannot be read"):
            ShardSet.from_info(url + "/nowhere", "train")
    finally:
        server.shutdown()


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shards_are_skipped_counted_and_batches_stay_full(tmp_path, workers, caplog):
    folder = Path(make_shards(tmp_path, 7))
    train_shards = sorted(folder.glob("*-train-*.tar"))
    damage(train_shards[0], "truncate")   # a shard cut in the middle of a member
    damage(train_shards[2], "corrupt_jpeg")  # images that do not decode
    loader = WdsLoader(ShardSet.from_info(str(folder), "train"), 4, 0, 1, workers, with_keys=True)
    with caplog.at_level(logging.WARNING):
        batches = keys_of(loader)
    assert len(batches) == len(loader) == 10 and all(len(b) == 4 for b in batches)
    assert loader.damaged >= 2
    if workers == 0:
        assert "skipping sample" in caplog.text and "skipping unreadable shard data" in caplog.text
    evaluation = WdsLoader(ShardSet.from_info(str(folder), "train"), 4, train=False, workers=workers, with_keys=True)
    seen = [k for b in keys_of(evaluation) for k in b]
    assert len(seen) == len(set(seen)) and 40 - 7 <= len(seen) < 40
    assert evaluation.damaged >= 2


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("fault", ["crop sampling", "DCT scale choice"])
def test_a_bug_in_the_decoder_is_a_traceback_not_damage(tmp_path, monkeypatch, workers, fault):
    """Only reading and decoding a sample's bytes counts as damage. A bug in the JPEG-bytes
    decoder's own code (planted here in its crop sampling, or in its choice of DCT scale) ends the
    iteration with its own exception and counts nothing; damaged bytes through the same decoder
    are still skipped and counted, and the batches stay full."""
    from cvtkit.data import jpeg_crop
    from cvtkit.data.transforms import AugmentConfig, train_decoder

    def planted_bug(*args):
        raise ZeroDivisionError(f"planted bug in the {fault}")
    folder = Path(make_shards(tmp_path, 7))
    damage(sorted(folder.glob("*-train-*.tar"))[2], "corrupt_jpeg")  # a JPEG that does not decode
    decoder = train_decoder(AugmentConfig(auto_augment=None), 32)
    loader = WdsLoader(ShardSet.from_info(str(folder), "train"), 4, 0, 1, workers, transform=decoder)
    batches = list(loader)
    assert len(batches) == 10 and all(len(labels) == 4 for _, labels in batches)
    assert loader.damaged == 1
    with monkeypatch.context() as m:
        if fault == "crop sampling":
            m.setattr(jpeg_crop.RandomResizedCropParams, "sample", planted_bug)
        else:
            m.setattr(jpeg_crop, "dct_reduction", planted_bug)
        broken = WdsLoader(ShardSet.from_info(str(folder), "train"), 4, 0, 1, workers, transform=decoder)
        with pytest.raises(ZeroDivisionError, match=f"planted bug in the {fault}"):
            next(iter(broken))
    assert broken.damaged == 0


def test_a_slot_with_nothing_readable_is_an_error_not_a_hang(tmp_path):
    from cvtkit.data.wds_loader import DamagedData
    folder = Path(make_shards(tmp_path, 7))
    for shard in folder.glob("*-train-*.tar"):
        shard.write_bytes(b"not a tar at all" * 10)
    with pytest.raises(DamagedData, match="no readable sample in"):
        keys_of(WdsLoader(ShardSet.from_info(str(folder), "train"), 4, 0, 1, 0, with_keys=True))


def photo_shards(root, size=(1200, 900), per_class=3):
    """Shards of a few large JPEGs (two classes, one validation image each)."""
    rng = random.Random(0)
    for split, count in (("train", per_class), ("val", 1)):
        for synset in fake.SYNSETS[:2]:
            (root / "src" / split / synset).mkdir(parents=True)
            for i in range(count):
                (root / "src" / split / synset / f"{synset}_{split}_{i}.JPEG").write_bytes(fake.jpeg(rng, size=size))
    run(PrepOptions(source=str(root / "src"), out=str(root / "out"), workers=1), progress=False)
    return root / "src", str(root / "out")


def test_evaluation_is_pixel_exact_to_pil_by_default(tmp_path):
    """Full decode, then the official resize and crop, as the PIL pipeline; the reduced-size
    decode is an option (and not pixel-exact)."""
    from PIL import Image

    from cvtkit.data.config import eval_loader_wds
    from cvtkit.shards import ShardInfo
    from cvtkit.models.factory import CENTER_224
    src, out = photo_shards(tmp_path)
    official = eval_transform(CENTER_224, normalize=False)
    expected = {label: official(Image.open(path).convert("RGB"))
                for label, synset in enumerate(fake.SYNSETS[:2]) for path in (src / "val" / synset).iterdir()}
    for reduced in (False, True):
        loader = eval_loader_wds(ShardInfo.read(out), "validation", CENTER_224, 2, 0, 1, 0, reduced_decode=reduced)
        images, labels = next(iter(loader))
        same = [torch.equal(img, expected[int(y)]) for img, y in zip(images, labels)]
        assert same == [not reduced] * 2


def test_jpeg_bytes_path_is_pils_crop_within_a_grey_level():
    """The crop drawn before decoding, decoded in full or at a reduced DCT scale, then resized
    with PyTorch's antialiased bicubic: what timm's PIL resized crop gives, to rounding. A
    reduced decode is libjpeg's own scaled decode (PIL's `draft`) with the crop's box scaled to
    it, to within one grey level everywhere; on a textured photo-like image, a crop misplaced by
    one full-size pixel differs by tens of grey levels."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import functional as TF

    from cvtkit.bench.loaders import photo
    from cvtkit.data import jpeg_crop as jpeg
    encoded = io.BytesIO()
    photo(np.random.default_rng(3), size=(1200, 900)).save(encoded, "JPEG", quality=90)
    raw = encoded.getvalue()
    full = Image.open(io.BytesIO(raw)).convert("RGB")

    def diff(a, b):
        d = (a.int() - b.int()).abs().float()
        return d.max().item(), d.mean().item()
    for box, reduction in [((100, 200, 300, 400), 1), ((50, 60, 500, 700), 2), ((3, 5, 896, 1190), 4)]:
        assert jpeg.dct_reduction(box[3], box[2], 224) == reduction
        pixels, applied = jpeg.decode_rgb(raw, reduction)
        assert applied == reduction and pixels.shape[:2] == (900 // reduction, 1200 // reduction)
        ours = torch.from_numpy(jpeg.resized_crop(pixels, box, reduction, 224)).permute(2, 0, 1)
        timm_crop = TF.pil_to_tensor(TF.resized_crop(full, *box, [224, 224], TF.InterpolationMode.BICUBIC))
        top, left, h, w = box
        reduced = Image.open(io.BytesIO(raw))
        reduced.draft("RGB", (1200 // reduction, 900 // reduction))
        scaled = TF.pil_to_tensor(reduced.convert("RGB").resize(
            (224, 224), Image.BICUBIC, box=(left / reduction, top / reduction, (left + w) / reduction,
                                           (top + h) / reduction)))
        worst, mean = diff(ours, timm_crop if reduction == 1 else scaled)
        assert worst <= 1 and mean < 0.05, (reduction, worst, mean)
        # what the reduced decode gives up against the full-size path (docs/evaluation.md)
        assert diff(ours, timm_crop)[1] < (0.05 if reduction == 1 else 4), reduction
    png = io.BytesIO()
    Image.new("RGB", (80, 60), (9, 99, 199)).save(png, "PNG")  # not a JPEG: PIL decodes it
    assert jpeg.jpeg_size(png.getvalue()) == (80, 60) and jpeg.decode_rgb(png.getvalue(), 2)[1] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_jpeg_bytes_path_gives_uint8_crops_and_resumes_exactly(shards, workers):
    """The DeiT recipe from JPEG bytes: uint8 batches, the same pixels after a mid-epoch resume
    (each sample seeded by its place in the epoch), and the trainer's RNG left untouched."""
    from cvtkit.data.transforms import AugmentConfig, train_decoder

    def make():
        return WdsLoader(ShardSet.from_info(shards, "train"), 4, 0, 1, workers, seed=3, with_keys=True,
                         transform=train_decoder(AugmentConfig(), 32))
    reference = list(make())
    images = reference[0][0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and images.float().std() > 0
    first = make()
    torch.manual_seed(7)
    random.seed(7)
    head = list(itertools.islice(first, 3))
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(7)).item()
    assert random.random() == random.Random(7).random()
    second = make()
    second.load_state_dict(first.state_dict())
    for (x, y, k), (rx, ry, rk) in zip(head + list(second), reference):
        assert torch.equal(x, rx) and torch.equal(y, ry) and k == rk


def test_jpeg_bytes_path_skips_and_counts_damage(tmp_path):
    from cvtkit.data.transforms import AugmentConfig, train_decoder
    folder = Path(make_shards(tmp_path, 7))
    train_shards = sorted(folder.glob("*-train-*.tar"))
    damage(train_shards[0], "truncate")
    damage(train_shards[2], "corrupt_jpeg")
    loader = WdsLoader(ShardSet.from_info(str(folder), "train"), 4, 0, 1, 0, with_keys=True,
                       transform=train_decoder(AugmentConfig(), 32))
    batches = keys_of(loader)
    assert len(batches) == len(loader) == 10 and all(len(b) == 4 for b in batches)
    assert loader.damaged >= 2
