"""Webdataset loaders: balanced across ranks and workers, deterministic, resumable mid-epoch.

Every (rank, worker) pair is a *slot*; `slots = world_size * num_workers`. For each epoch the shard
list is shuffled with (seed, epoch), the same on every rank, and dealt to the slots:
- with at least as many shards as slots, slot s reads shards s, s + slots, ...;
- with fewer, the slots sharing a shard take every k-th sample of it, so no slot is empty.
Training: every rank delivers exactly `num_samples // (world_size * batch_size)` batches, split
over its workers so that batch b comes from worker b % num_workers (DataLoader's round robin);
a slot whose data runs short cycles over it again (as timm does), so no rank ever waits on
another. Each slot shuffles raw samples in a buffer seeded by (seed, epoch, slot), before decoding.
Resume: the position is the number of batches delivered in the epoch; a restarted worker skips its
share of raw samples without decoding them, so the continued epoch equals an uninterrupted one.
Evaluation: no shuffle, no cycling: every sample exactly once across all ranks.
Transforms: a PIL transform gets the decoded image; one marked `takes_bytes`
(`transforms.train_decoder`) gets the JPEG bytes and decodes only what its crop needs. Workers
collate into shared memory, so a batch reaches the trainer's process without another copy.
Damage: a sample that does not decode, or a shard that cannot be read (truncated, corrupt), is
skipped with a warning and counted (`WdsLoader.damaged`), and only that (an error in a transform's
own code is a bug, with its traceback); training draws the next sample instead, so every rank
still delivers its batches. Resume stays exact on undamaged data; after a skip the
resumed epoch can be off by the samples skipped before the stop.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
import multiprocessing
import random
import zlib
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from cvtkit.errors import CvtkitError
from cvtkit.rng import host_seeded

from cvtkit.shards import ShardFolderError, ShardSet

from .position import EpochLoader

log = logging.getLogger(__name__)


def slot_plan(num_shards: int, slots: int, slot: int) -> tuple[list[int], int, int]:
    """Which shards slot `slot` reads, and the sample stride and phase within them."""
    if num_shards >= slots:
        return list(range(slot, num_shards, slots)), 1, 0
    shard = slot % num_shards
    sharing = len(range(shard, slots, num_shards))  # slots that read this shard
    return [shard], sharing, slot // num_shards


def _decode(sample: dict, min_side: int = 0, reading=contextlib.nullcontext) -> tuple[Image.Image, int, str]:
    """JPEG bytes -> RGB image. With `min_side`, large JPEGs are decoded at a reduced DCT scale
    (1/2, 1/4, 1/8) that keeps the shorter side at least `min_side`: the transform that follows
    never needs more pixels than that. `reading()` is entered around what reads the sample."""
    with reading():
        img = Image.open(io.BytesIO(sample["jpg"]))
        label, key = int(sample["cls"]), sample["__key__"]
    draft = None
    if min_side and img.format == "JPEG":
        w, h = img.size
        short = min(w, h)
        if short >= 2 * min_side:
            draft = (w * min_side // short + 1, h * min_side // short + 1)
    with reading():
        if draft is not None:
            img.draft("RGB", draft)
        return img.convert("RGB"), label, key


class DamagedData(CvtkitError, RuntimeError):
    """Every sample a slot could read is damaged: nothing to train on."""
    exit_code = 1


class _Unreadable(Exception):
    """Reading a sample's bytes failed; `__cause__` is what the library raised."""


@contextlib.contextmanager
def _reading_bytes():
    """Around the calls that read a sample's bytes, and only those: what PIL, libjpeg-turbo or the
    sample's fields raise there is damage (skipped and counted); an error anywhere else, such as
    a transform's crop sampling, is a bug and keeps its traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - PIL and libjpeg-turbo raise many kinds for damaged bytes
        raise _Unreadable from e


class _SlotStream(IterableDataset):
    def __init__(self, shards: ShardSet, rank: int, world_size: int, batch_size: int, seed: int,
                 epoch: int, transform: Callable | None, train: bool, shuffle_buffer: int,
                 skip_batches: int, with_keys: bool, decode_min_side: int, damaged):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.transform, self.train, self.shuffle_buffer = transform, train, shuffle_buffer
        self.skip_batches, self.with_keys = skip_batches, with_keys
        self.decode_min_side = decode_min_side
        self.damaged = damaged  # a multiprocessing.Value shared with the workers

    def _count_damage(self, what: str, error: BaseException) -> None:
        with self.damaged.get_lock():
            self.damaged.value += 1
        log.warning("skipping %s: %s: %s (%d damaged so far on rank %d)", what, type(error).__name__,
                    error, self.damaged.value, self.rank)

    def _shard_error(self, error: BaseException) -> bool:
        """webdataset's handler: a shard that cannot be read (or read to its end) is skipped."""
        self._count_damage("unreadable shard data", error)
        return True

    def _raw(self, shard_ids: list[int], stride: int, phase: int) -> Iterator[dict]:
        urls = [{"url": self.shards.urls[i]} for i in shard_ids]
        # labels as the split gives them (an alt-label split leaves samples out) before the
        # stride, the shuffle and a resume's skip, which all count the split's samples
        samples = self.shards.labelled(wds.tarfile_to_samples(handler=self._shard_error)(urls), self._count_damage)
        return (s for i, s in enumerate(samples) if i % stride == phase)

    def _cycled(self, shard_ids: list[int], stride: int, phase: int, rng: random.Random) -> Iterator[dict]:
        """Shuffled passes over the slot's data, one after another (a pass never borrows from the
        next, so nothing repeats before all was seen)."""
        shuffle = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)
        while True:
            count = 0
            for sample in shuffle(self._raw(shard_ids, stride, phase)):
                count += 1
                yield sample
            if count == 0:
                raise DamagedData(f"no readable sample in {', '.join(self.shards.urls[i] for i in shard_ids)}")

    def __iter__(self):
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        # DataLoader takes batches round robin from workers 0, 1, ...; after `skip_batches` the
        # next batch belongs to worker skip_batches % workers, so a resumed loader's worker 0 plays
        # that role and the order carries on unchanged.
        worker = (physical + self.skip_batches) % workers
        slots, slot = self.world_size * workers, self.rank * workers + worker
        order = list(range(len(self.shards.urls)))
        if self.train:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        ids, stride, phase = slot_plan(len(order), slots, slot)
        ids = [order[i] for i in ids]
        if not self.train:
            stream: Iterator[dict] = self._raw(ids, stride, phase)
            first, quota = 0, None
        else:
            per_rank = self.shards.num_samples // (self.world_size * self.batch_size)
            my_batches = per_rank // workers + (worker < per_rank % workers)
            # Shuffle raw bytes within each pass, cycling so that a short slot still fills its quota.
            shuffled = self._cycled(ids, stride, phase, random.Random(f"{self.seed}:{self.epoch}:{slot}"))
            done = self.skip_batches // workers + (worker < self.skip_batches % workers)
            first, quota = done * self.batch_size, (my_batches - done) * self.batch_size
            stream = itertools.islice(shuffled, first, None)
        slot_samples = sum(self.shards.lengths[i] for i in ids) // stride + 1
        delivered = bad_in_a_row = 0
        if quota is not None and quota <= 0:
            return
        for index, sample in enumerate(stream, start=first):
            with host_seeded(_sample_seed(f"{self.seed}:{self.epoch}:{slot}:{index}" if self.train else None),
                             restore=info is None):
                try:
                    img, label, key = self._load(sample)
                except _Unreadable as e:
                    self._count_damage(f"sample {sample.get('__key__')} of {sample.get('__url__')}", e.__cause__)
                    bad_in_a_row += 1
                    if bad_in_a_row > slot_samples:
                        raise DamagedData(f"every sample of {', '.join(self.shards.urls[i] for i in ids)} "
                                          f"is damaged") from e.__cause__
                    continue
                if self.transform is not None:
                    img = self.transform(img)
            bad_in_a_row = 0
            delivered += 1
            yield (img, label, key) if self.with_keys else (img, label)
            if quota is not None and delivered >= quota:
                break

    def _load(self, sample: dict):
        """The sample's image as the transform takes it: decoded by PIL, or, for a transform of
        JPEG bytes (`takes_bytes`), its crop drawn and decoded. The step that reads the sample's
        bytes; only that reading runs under `_reading_bytes`, whose errors count as damage."""
        if getattr(self.transform, "takes_bytes", False):
            with _reading_bytes():
                data, label, key = sample["jpg"], int(sample["cls"]), sample["__key__"]
            return self.transform.decode(data, _reading_bytes), label, key
        return _decode(sample, self.decode_min_side, _reading_bytes)


def _sample_seed(name: str | None) -> int | None:
    """The seed of a sample's augmentation, from its place in the epoch (`name`), so that a resumed
    epoch augments each sample exactly as an uninterrupted one; None: no seeding (evaluation)."""
    return None if name is None else zlib.crc32(name.encode())


def _collate(batch):
    # default_collate stacks into shared memory inside a worker: the batch crosses to the
    # trainer's process without the extra copy that pickling a plain tensor makes.
    # A tuple is an image with its RandAugment draws (`randaugment_device.RandAugmented`):
    # default_collate stacks each field.
    tensors = isinstance(batch[0][0], (torch.Tensor, tuple))
    images = default_collate([b[0] for b in batch]) if tensors else [b[0] for b in batch]
    labels = torch.tensor([b[1] for b in batch])
    return (images, labels, [b[2] for b in batch]) if len(batch[0]) == 3 else (images, labels)


class WdsLoader(EpochLoader):
    """Batches of one rank. Training: `len(loader)` batches per epoch on every rank, resumable
    through `state_dict()`; evaluation (`train=False`): each sample once across ranks."""

    def __init__(self, shards: ShardSet, batch_size: int, rank: int = 0, world_size: int = 1,
                 workers: int = 2, seed: int = 0, transform: Callable | None = None,
                 train: bool = True, shuffle_buffer: int = 2000, with_keys: bool = False,
                 decode_min_side: int = 0):
        """`decode_min_side`: the smallest shorter side the transform needs (see
        `transforms.min_decode_side`); 0 decodes every image at full size."""
        if train and shards.num_samples < world_size * batch_size:
            raise ShardFolderError(f"{shards.num_samples} samples cannot give one batch of {batch_size} "
                             f"to each of {world_size} ranks")
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.workers, self.seed, self.transform, self.train = workers, seed, transform, train
        self.shuffle_buffer, self.with_keys = shuffle_buffer, with_keys
        self.decode_min_side = decode_min_side
        self._start_position()
        self._damaged = multiprocessing.Value("q", 0)

    @property
    def damaged(self) -> int:
        """Damaged samples and shard read errors skipped so far by this rank (all workers)."""
        return self._damaged.value

    def __len__(self) -> int:
        if self.train:
            return self.shards.num_samples // (self.world_size * self.batch_size)
        raise TypeError("an evaluation loader's length differs between ranks")

    @property
    def samples_delivered(self) -> int:
        """Samples this rank has delivered in the current epoch."""
        return self.batches_done * self.batch_size

    def _epoch_batches(self, epoch: int, skip: int):
        dataset = _SlotStream(self.shards, self.rank, self.world_size, self.batch_size, self.seed,
                              epoch, self.transform, self.train, self.shuffle_buffer, skip,
                              self.with_keys, self.decode_min_side, self._damaged)
        # Its own generator: creating the loader must not draw from the trainer's global RNG,
        # or a resumed run's dropout and mixup would differ from an uninterrupted one.
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=_collate, generator=torch.Generator().manual_seed(self.seed))
        yield from loader
