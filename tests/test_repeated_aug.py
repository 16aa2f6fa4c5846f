"""Repeated augmentation (`data.repeated_aug`, DeiT's RASampler) in the webdataset loader: each
sample of an epoch shown R times, each copy on another rank with its own augmentation, the epoch
keeping its steps, resumable and in an order that does not depend on the world size."""
import collections
import itertools
import json

import pytest

from cvtkit.config_loader import ConfigError, load_config
from cvtkit.data.config import RunData
from cvtkit.data.slots import SlotLayout
from cvtkit.data.transforms import AugmentConfig, train_decoder
from cvtkit.data.wds_loader import LoaderStateError, WdsLoader
from cvtkit.shards import ShardSet
from cvtkit.train.run_config import RunConfig
from cvtkit.train.trainer import EXIT_REQUEUE
from helpers import REPO, TINY_CONFIG, make_tiny_shards, train, train_losses

# 36 samples of 40 px in 6 shards of 6; global batch 6 in micro-batches of 2: 3 units, 6 slots of
# one sample a step, 6 steps an epoch, so each slot's 6 places hold whole triples of copies.
GLOBAL, MICRO, SAMPLES = 6, 2, 36


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("ra"), per_class=9, shard_samples=6)


def loaders(shards, world, repeated_aug=3, workers=0, state=None):
    """One loader per rank; random crop and flip at 16 px (no RandAugment: fast)."""
    decoder = train_decoder(AugmentConfig(auto_augment=None), 16)
    made = [WdsLoader(ShardSet.from_info(shards, "train"), MICRO, rank, world, workers, seed=5,
                      transform=decoder, with_keys=True, global_batch=GLOBAL, repeated_aug=repeated_aug)
            for rank in range(world)]
    for loader in made:
        if state is not None:
            loader.load_state_dict(state)
    return made


def samples(batch):
    """(key, label, pixels) of each sample of a batch."""
    images, labels, keys = batch
    return [(k, int(y), img.numpy().tobytes()) for img, y, k in zip(images, labels, keys)]


def steps(shards, world, **kw):
    """Each global step's samples in micro-batch order (rank 0's micro-batches, then rank 1's...)."""
    per_rank = [[samples(b) for b in loader] for loader in loaders(shards, world, **kw)]
    accum = GLOBAL // MICRO // world
    return [[s for r in range(world) for b in per_rank[r][i * accum:(i + 1) * accum] for s in b]
            for i in range(len(per_rank[0]) // accum)]


def test_each_sample_three_times_on_three_ranks_with_other_pixels(shards):
    shown = collections.defaultdict(list)  # key -> [(rank, pixels)]
    for rank, loader in enumerate(loaders(shards, 3)):
        for batch in loader:
            for key, _, pixels in samples(batch):
                shown[key].append((rank, pixels))
    assert len(shown) == SAMPLES // 3, "an epoch shows a third of the samples"
    for key, copies in shown.items():
        assert len(copies) == 3, key
        assert {rank for rank, _ in copies} == {0, 1, 2}, key
        assert len({pixels for _, pixels in copies}) == 3, f"{key}: the copies share an augmentation"


def test_an_epoch_keeps_its_steps(shards):
    for world in (1, 3):
        plain, repeated = loaders(shards, world, 1)[0], loaders(shards, world, 3)[0]
        assert len(repeated) == len(plain) == SAMPLES // GLOBAL * (3 // world)
        assert sum(1 for _ in repeated) == len(plain)
        assert repeated.epoch == 1


@pytest.mark.parametrize("world,workers,stop", [(3, 0, 2), (1, 2, 7)])
def test_resume_mid_epoch_continues_with_the_same_batches(shards, world, workers, stop):
    """Stopped after `stop` batches (on 1 rank: inside a step), resumed by new loaders: the same
    remaining batches, pixels and labels, as the uninterrupted epoch."""
    reference = [[samples(b) for b in loader] for loader in loaders(shards, world, workers=workers)]
    first = loaders(shards, world, workers=workers)
    for loader in first:
        assert len(list(itertools.islice(loader, stop))) == stop
    state = first[0].state_dict()
    assert state["repeated_aug"] == 3 and all(loader.state_dict() == state for loader in first)
    resumed = loaders(shards, world, workers=workers, state=state)
    assert [[samples(b) for b in loader] for loader in resumed] == [batches[stop:] for batches in reference]


def test_the_order_does_not_depend_on_the_world_size(shards):
    """The global batch of each step: the same samples (keys, and copies by their pixels) in the
    same micro-batches on 3 ranks, on 1, and with workers."""
    reference = steps(shards, 3)
    assert len(reference) == SAMPLES // GLOBAL and all(len(step) == GLOBAL for step in reference)
    assert steps(shards, 1) == reference
    assert steps(shards, 1, workers=2) == reference


def assert_copies_spread(layout):
    """On every world size that serves the units, the copies of a source slot's sample go to
    distinct ranks when there are at least as many ranks as copies, else to distinct
    micro-batches; every slot shows each copy of exactly one source."""
    shown = collections.defaultdict(list)  # source slot -> (copy, the slot showing it)
    for slot in range(layout.slots):
        for copy, source in enumerate(layout.sources(slot)):
            shown[source].append((copy, slot))
    assert sorted(shown) == list(range(layout.slots))
    for world in (w for w in range(1, layout.units + 1) if layout.units % w == 0):
        accum = layout.accumulation(world)
        for source, copies in shown.items():
            assert sorted(copy for copy, _ in copies) == list(range(layout.repeats))
            units = {slot // layout.per_unit for _, slot in copies}
            assert len(units) == layout.repeats, (world, source)
            if world >= layout.repeats:
                assert len({unit // accum for unit in units}) == layout.repeats, (world, source)


@pytest.mark.parametrize("global_batch,micro,slots,repeats", [(8, 2, 4, 3), (18, 2, 18, 3), (64, 4, 32, 4),
                                                              (12, 2, 12, 2)])
def test_copies_land_on_distinct_ranks_in_any_layout_with_enough_units(global_batch, micro, slots, repeats):
    assert_copies_spread(SlotLayout.make(global_batch, micro, slots, repeats=repeats))


def test_the_ceit_recipes_repeat_three_times_in_their_layouts():
    """1024 in micro-batches of 256 (4 units), 512 in 64 (8 units): copies one and two units apart."""
    recipes = [*REPO.glob("configs/pretrain/ceit_*.yaml"), *REPO.glob("configs/finetune/ceit_*.yaml")]
    assert len(recipes) == 4
    for path in recipes:
        cfg = load_config(RunConfig, path)
        assert cfg.data.repeated_aug == 3, path
        layout = SlotLayout.make(cfg.data.batch_size, cfg.engine.micro_batch, repeats=cfg.data.repeated_aug)
        assert_copies_spread(layout)


def test_the_run_config_reaches_the_loader(shards):
    cfg = load_config(RunConfig, TINY_CONFIG, [f"data.train={shards}", f"data.val={shards}", "data.repeated_aug=3"])
    loader = RunData.open(cfg.data).train_loader(4, 0, 1, 0)
    assert loader.layout.repeats == 3 and loader.state_dict()["repeated_aug"] == 3


def test_bad_combinations_are_one_line_errors(shards):
    for fmt, where in (("ffcv", "x.beton"), ("dali", "x")):
        with pytest.raises(ConfigError, match=rf"data.repeated_aug: expected 1 with data.format {fmt} .*got 3$"):
            load_config(RunConfig, TINY_CONFIG, [f"data.train={where}", f"data.format={fmt}", "data.repeated_aug=3"])
    with pytest.raises(ConfigError, match=r"data.repeated_aug: expected >= 1"):
        load_config(RunConfig, TINY_CONFIG, ["data.train=x", "data.repeated_aug=0"])
    with pytest.raises(ConfigError, match=r"^data.repeated_aug=3: the copies of a sample go to 3 different "
                                          r"micro-batches, but the global batch 4 in micro-batches of 2 has 2; "
                                          r"use data.repeated_aug <= 2 or a micro batch of at most 1"):
        WdsLoader(ShardSet.from_info(shards, "train"), 2, 0, 1, 0, global_batch=4, repeated_aug=3)
    stopped = loaders(shards, 3)[0]
    next(iter(stopped))
    with pytest.raises(LoaderStateError, match=r"^data.repeated_aug=1: the checkpoint stopped inside an epoch drawn "
                                               r"with data.repeated_aug=3, .*resume with data.repeated_aug=3 "):
        loaders(shards, 3, repeated_aug=1, state=stopped.state_dict())
    loaders(shards, 3, repeated_aug=1, state=loaders(shards, 3)[0].state_dict())  # at an epoch's start


@pytest.mark.slow
def test_a_run_resumed_on_another_world_size_trains_on_the_same_copies(tmp_path):
    """The trainer with `data.repeated_aug: 3` (real DeepSpeed over gloo, a tiny CvT): 64 samples in
    4 shards of 16, global batch 16 in 4 micro-batches of 4, so 4 slots of 16 places an epoch: 5
    samples of each slot shown 3 times and a 6th once (the epoch ends); stopped on 2 ranks 2 steps
    in (8 places: inside a triple of copies) and resumed on 1, it trains on the micro-batches and
    losses of an uninterrupted 2-rank run, random crops and flips included."""
    shards = make_tiny_shards(tmp_path / "data", shard_samples=16)
    run = ["engine.micro_batch=4", "data.trace=true", "data.repeated_aug=3", "data.augment.kind=finetune",
           "schedule.epochs=2", "log.every_steps=1", "checkpoint.every_steps=0", "model.drop_path_rate=0.0"]

    def trace(root):
        lines = [json.loads(line) for line in (root / "tiny_cpu" / "trace.jsonl").read_text().splitlines()]
        return [line["keys"] for line in lines]
    codes, out = train(tmp_path / "reference", shards, run, nproc=2)
    assert codes == [0, 0], out
    reference = trace(tmp_path / "reference")
    assert len(reference) == 8
    epoch = collections.Counter(k for step in reference[:4] for k in step)
    assert sorted(collections.Counter(epoch.values()).items()) == [(1, 4), (3, 20)]
    codes, out = train(tmp_path / "resumed", shards, [*run, "checkpoint.stop_at_step=2"], nproc=2)
    assert codes == [EXIT_REQUEUE] * 2, out
    codes, out = train(tmp_path / "resumed", shards, run, nproc=1)
    assert codes == [0], out
    assert trace(tmp_path / "resumed") == reference
    theirs, ours = train_losses(tmp_path / "reference" / "tiny_cpu"), train_losses(tmp_path / "resumed" / "tiny_cpu")
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    worst = max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in theirs)
    print(f"largest relative loss difference: {worst:.2e}")
    assert worst <= 1e-5
