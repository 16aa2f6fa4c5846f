"""The DALI loader on CPU (`device_id=None`): index files, rank balance, exact resume, damage,
the crop distribution, and training with `data.format=dali`."""
import io
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvtkit.data.dali_index_cache import INDEX_FOLDER, shard_index
from cvtkit.data.dali_loader import DaliLoader
from cvtkit.prep.pipeline import PrepOptions, run
from cvtkit.shards import ShardSet
from cvtkit.data.transforms import AugmentConfig
from cvtkit.data.wds_loader import DamagedData

import fake_imagenet as fake
from fake_imagenet import damage
from helpers import REPO, cannot_run, make_tiny_shards, metrics, train, train_losses

PLAIN = AugmentConfig(kind="none")  # a fast-building pipeline for the contract tests


def make_shards(root, shard_samples=7):
    """40 train samples in shards of 7 (7,7,7,7,7,5), 12 validation samples."""
    src = fake.make_imagenet1k(root / "in1k")
    run(PrepOptions(source=str(src), out=str(root / "out"), shard_samples=shard_samples, workers=1),
        progress=False)
    return root / "out"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("dali"))


def loader(folder, rank=0, world=1, augment=PLAIN, **kw):
    return DaliLoader(ShardSet.from_info(str(folder), "train"), 4, 32, rank, world, workers=1, seed=3,
                      augment=augment, device="cpu", with_keys=True, **kw)


def epoch(dali, limit=None):
    """(images, labels, keys) of each batch; with `limit`, only that many batches."""
    out = []
    for batch in dali:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def test_index_files_are_made_once_and_checked(shards):
    first = shard_index(sorted(shards.glob("*-train-*.tar"))[0])
    assert Path(first.path).parent == shards / INDEX_FOLDER and (first.samples, first.dropped) == (7, 0)
    made = Path(first.path).stat().st_mtime_ns
    assert shard_index(sorted(shards.glob("*-train-*.tar"))[0]).path == first.path
    assert Path(first.path).stat().st_mtime_ns == made  # cached, not made again
    assert not list((shards / INDEX_FOLDER).glob(".*"))  # no temporary file left behind


def test_index_of_a_read_only_shard_folder_goes_to_the_cache(shards, tmp_path):
    """A real read-only bind mount (in a private mount namespace): the index lands in the cache."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        cannot_run("needs `unshare -m` (root) for a read-only bind mount")
    folder = tmp_path / "ro"
    shutil.copytree(shards, folder, ignore=shutil.ignore_patterns(INDEX_FOLDER))
    cache = tmp_path / "cache"
    code = (f"from cvtkit.data.dali_index_cache import shard_index; "
            f"print(shard_index({str(sorted(folder.glob('*-train-*.tar'))[0])!r}).path)")
    script = (f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && "
              f"CVTKIT_CACHE={cache} {sys.executable} -c {code!r}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(cache / "dali-index"))
    assert not (folder / INDEX_FOLDER).exists()


def test_ranks_get_equal_batches_and_shards_split_like_wds(shards):
    keys = {}
    for rank in range(2):
        dali = loader(shards, rank, 2)
        batches = epoch(dali)
        assert len(batches) == len(dali) == 40 // 8
        for images, labels, names in batches:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64 and len(names) == 4
        keys[rank] = {k for _, _, names in batches for k in names}
        assert dali.epoch == 1 and dali.batches_done == 0
    assert not keys[0] & keys[1]  # each rank reads its own shards
    assert loader(shards, 0, 2).plan(0).paths != loader(shards, 0, 2).plan(1).paths  # dealt anew each epoch
    few = loader(shards, 7, 8).plan(0)  # 6 shards, 8 ranks: ranks 1 and 7 share a shard, half each
    assert (few.num_shards, few.shard_id, len(few.paths)) == (2, 1, 1)


def test_resume_mid_epoch_gives_the_very_same_batches(shards):
    """The DeiT recipe (DALI's random crop, flip, RandAugment): DALI's checkpoint in the state."""
    deit = AugmentConfig()
    reference = epoch(loader(shards, augment=deit))
    first = loader(shards, augment=deit)
    head = epoch(first, limit=3)
    state = first.state_dict()
    assert state["batches_done"] == 3 and state["dali"].dtype == torch.uint8
    second = loader(shards, augment=deit)
    second.load_state_dict(state)
    tail = epoch(second)
    assert len(head) + len(tail) == len(reference) == 10
    for (x, y, k), (rx, ry, rk) in zip(head + tail, reference):
        assert torch.equal(x, rx) and torch.equal(y, ry) and k == rk


def test_damaged_shards_and_samples_are_skipped_and_counted(tmp_path):
    folder = make_shards(tmp_path)
    train_shards = sorted(folder.glob("*-train-*.tar"))
    damage(train_shards[0], "truncate")       # ends inside a member
    damage(train_shards[2], "corrupt_jpeg")   # an image that is not a JPEG
    train_shards[4].write_bytes(b"not a tar at all" * 10)
    dali = loader(folder)
    batches = epoch(dali)
    assert len(batches) == len(dali) == 10 and all(len(b[1]) == 4 for b in batches)
    assert dali.damaged >= 3  # the truncated sample, the non-JPEG, the shard that is no tar
    for shard in train_shards:
        shard.write_bytes(b"not a tar at all" * 10)
    with pytest.raises(DamagedData, match="no readable sample in"):
        epoch(loader(folder))


def _jpeg_bytes(width, height):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _dali_crops(width, height, batches=8, batch=256):
    """(h, w) of DALI's random crops of one JPEG (image_random_crop outputs the crop unresized)."""
    from nvidia.dali import fn, pipeline_def
    data = _jpeg_bytes(width, height)

    @pipeline_def
    def crops():
        jpegs = fn.external_source(source=lambda: [data] * batch, batch=True)
        return fn.decoders.image_random_crop(jpegs, device="cpu", random_area=[0.08, 1.0],
                                             random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
    pipe = crops(batch_size=batch, num_threads=1, device_id=None, seed=3)
    pipe.build()
    return np.array([out[i].shape()[:2] for _ in range(batches) for out in pipe.run() for i in range(len(out))],
                    dtype=float)


def test_dali_crop_distribution_is_timms(seed=0):
    """Area and aspect of DALI's crops against timm's own RandomResizedCrop.get_params (KS tests);
    on a 5:1 image, where the fallback often decides, as often the same centre crop."""
    from scipy.stats import ks_2samp
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC
    random.seed(seed)
    for width, height in [(160, 120), (400, 80)]:
        dali = _dali_crops(width, height)
        timm = np.array([RRC.get_params(torch.empty(1, height, width), (0.08, 1.0), (3 / 4, 4 / 3))[2:]
                         for _ in range(len(dali))], dtype=float)
        fallback = np.array([height, round(height * 4 / 3)])
        fb_dali = np.all(np.abs(dali - fallback) <= 1, axis=1)  # DALI floors the fallback's width
        fb_timm = np.all(timm == fallback, axis=1)
        assert abs(fb_dali.mean() - fb_timm.mean()) < 0.04
        d, t = dali[~fb_dali], timm[~fb_timm]
        assert ks_2samp(d[:, 0] * d[:, 1], t[:, 0] * t[:, 1]).pvalue > 1e-3
        assert ks_2samp(np.log(d[:, 1] / d[:, 0]), np.log(t[:, 1] / t[:, 0])).pvalue > 1e-3


@pytest.mark.slow
def test_train_cli_trains_with_dali_and_resumes(tmp_path):
    """`pretrain/train.py` on the tiny config with `data.format=dali` (one process, CPU): stopped
    at step 6, its checkpoint (DALI's state inside) passes the pickle scan, and the resumed run's
    per-step losses are an uninterrupted run's (the same batches, to the bit)."""
    shards = make_tiny_shards(tmp_path)
    common = ["data.format=dali", "log.every_steps=1"]
    codes, out = train(tmp_path / "a", shards, common, nproc=1)
    assert codes == [0], out
    codes, out = train(tmp_path / "b", shards, [*common, "checkpoint.stop_at_step=6"], nproc=1)
    assert codes == [75], out
    codes, out = train(tmp_path / "b", shards, common, nproc=1)
    assert codes == [0], out
    ckpt = tmp_path / "b" / "tiny_cpu" / "checkpoints"
    assert f"resumed from {ckpt / 'step00000006'} at step 6" in out and "finished 16 steps" in out
    full, resumed = (train_losses(tmp_path / run / "tiny_cpu") for run in "ab")
    assert sorted(resumed) == list(range(1, 17)) and resumed == full
    assert any("val/top1" in m for m in metrics(tmp_path / "b" / "tiny_cpu"))
