"""Webdataset loaders: deterministic, resumable mid-epoch, and, for training, in a sample order
that does not depend on the number of ranks or of loader workers.

Training (`cvtkit.data.slots`): the run's virtual slots each read their share of the epoch's
shuffled shard list (`slot_plan`), shuffle raw samples in their own buffer seeded by (seed, epoch,
slot), and seed each sample's augmentation by (seed, epoch, slot, place in the slot's stream); a
global step takes `take` samples from every slot, and rank r at accumulation step a delivers the
micro-batch unit r * A + a, made of its slots' pieces in slot order. A rank's slots are dealt to
its workers (slot i to worker i % workers; more workers than slots stay idle), each worker collates
its pieces into shared memory, and the rank puts the pieces of each micro-batch together in order.
Every rank delivers `len(loader)` = steps per epoch x accumulation batches; a slot whose data runs
short cycles over it again (as timm does). Memory: each slot holds `shuffle_buffer` raw samples,
so a rank holds slots / world_size buffers.
Repeated augmentation (`repeated_aug` R > 1, `slots.SlotLayout.sources`): a slot's stream
interleaves R copy streams, copy k re-reading the shards of its source slot with the same
shuffle (each buffering `shuffle_buffer` / R, so a slot's memory stays the same) and seeding each
sample's augmentation by its place and k; each source sample is read and decoded once per copy,
on the rank that shows it.
Resume: the position is global (epoch, steps done), the same on every rank; a resumed slot skips
its consumed raw samples without decoding them, so the continued epoch equals an uninterrupted one
on any world size that divides the units and with any number of workers.
Evaluation: every (rank, worker) pair reads a disjoint share, no shuffle, no cycling: every sample
exactly once across all ranks.
Transforms: a PIL transform gets the decoded image; one marked `takes_bytes`
(`transforms.train_decoder`) gets the JPEG bytes and decodes only what its crop needs.
Damage: a sample that does not decode, or a shard that cannot be read (truncated, corrupt), is
skipped with a warning and counted (`WdsLoader.damaged`); training draws the next sample instead,
so every rank still delivers its batches. Resume stays exact on undamaged data; after a skip the
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

from .position import EpochLoader, LoaderStateError
from .slots import SlotLayout, slot_plan

log = logging.getLogger(__name__)


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


class _Reader(IterableDataset):
    """What the training and evaluation streams share: raw samples of a slot's shards, damage
    counting, decoding and the transform."""

    def __init__(self, shards: ShardSet, rank: int, seed: int, epoch: int, transform: Callable | None,
                 shuffle_buffer: int, with_keys: bool, decode_min_side: int, damaged):
        self.shards, self.rank, self.seed, self.epoch = shards, rank, seed, epoch
        self.transform, self.shuffle_buffer, self.with_keys = transform, shuffle_buffer, with_keys
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

    def _plan(self, slots: int, slot: int, shuffled: bool) -> tuple[list[int], int, int]:
        """The shards of `slot` among `slots` in this epoch (shuffled by (seed, epoch) for training)."""
        order = list(range(len(self.shards.urls)))
        if shuffled:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        ids, stride, phase = slot_plan(len(order), slots, slot)
        return [order[i] for i in ids], stride, phase

    def _raw(self, shard_ids: list[int], stride: int, phase: int) -> Iterator[dict]:
        urls = [{"url": self.shards.urls[i]} for i in shard_ids]
        # labels as the split gives them (an alt-label split leaves samples out) before the
        # stride, the shuffle and a resume's skip, which all count the split's samples
        samples = self.shards.labelled(wds.tarfile_to_samples(handler=self._shard_error)(urls), self._count_damage)
        return (s for i, s in enumerate(samples) if i % stride == phase)

    def _cycled(self, shard_ids: list[int], stride: int, phase: int, rng: random.Random,
                buffer: int) -> Iterator[dict]:
        """Shuffled passes over the slot's data, one after another (a pass never borrows from the
        next, so nothing repeats before all was seen)."""
        shuffle = wds.shuffle(buffer, min(buffer, 100), rng=rng)
        while True:
            count = 0
            for sample in shuffle(self._raw(shard_ids, stride, phase)):
                count += 1
                yield sample
            if count == 0:
                raise DamagedData(f"no readable sample in {', '.join(self.shards.urls[i] for i in shard_ids)}")

    def _samples(self, stream: Iterator[dict], ids: list[int], stride: int, first: int,
                 seed_name: str | None, restore: bool, copy: int = 0):
        """(image, label, key) of each readable sample of `stream`, whose first has index `first`;
        with `seed_name`, each sample's augmentation is seeded by (seed_name, index, copy)."""
        slot_samples = sum(self.shards.lengths[i] for i in ids) // stride + 1
        bad_in_a_row = 0
        for index, sample in enumerate(stream, start=first):
            with host_seeded(_sample_seed(None if seed_name is None else f"{seed_name}:{index}", copy),
                             restore=restore):
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
            yield (img, label, key) if self.with_keys else (img, label)

    def _load(self, sample: dict):
        """The sample's image as the transform takes it: decoded by PIL, or, for a transform of
        JPEG bytes (`takes_bytes`), its crop drawn and decoded. The step that reads the sample's
        bytes; only that reading runs under `_reading_bytes`, whose errors count as damage."""
        if getattr(self.transform, "takes_bytes", False):
            with _reading_bytes():
                data, label, key = sample["jpg"], int(sample["cls"]), sample["__key__"]
            return self.transform.decode(data, _reading_bytes), label, key
        return _decode(sample, self.decode_min_side, _reading_bytes)


class _EvalStream(_Reader):
    """Evaluation: every (rank, worker) pair is a slot reading a disjoint share, in shard order."""

    def __init__(self, world_size: int, *args):
        super().__init__(*args)
        self.world_size = world_size

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        ids, stride, phase = self._plan(self.world_size * workers, self.rank * workers + worker, False)
        yield from self._samples(self._raw(ids, stride, phase), ids, stride, 0, None, info is None)


class _TrainPieces(_Reader):
    """Training: for each rank batch from `skip` on, this worker's part of it, as (batch index,
    first slot of the part in its unit, the collated samples of the worker's slots of that unit in
    slot order). The rank's slots are dealt to the workers in contiguous blocks, so each worker's
    part is one run of slots and the parts of a batch join in worker order, one message each."""

    def __init__(self, layout: SlotLayout, world_size: int, steps: int, skip: int, *args):
        super().__init__(*args)
        self.layout, self.accum, self.steps, self.skip = layout, layout.accumulation(world_size), steps, skip

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        layout, accum = self.layout, self.accum
        first_step, first_unit = divmod(self.skip, accum)
        mine: dict[int, list] = {}  # unit in the rank -> [(slot index in the unit, first step, samples)]
        for a in range(accum):
            start = first_step + (a < first_unit)  # this step's earlier units were delivered
            for j, slot in enumerate(layout.unit_slots(self.rank * accum + a)):
                if (a * layout.per_unit + j) * workers // (accum * layout.per_unit) == worker:
                    mine.setdefault(a, []).append((j, start, self._slot_samples(slot, start * layout.take,
                                                                                 info is None)))
        for step in range(first_step, self.steps):
            for a, streams in mine.items():
                if step >= streams[0][1]:
                    samples = [s for _, _, stream in streams for s in itertools.islice(stream, layout.take)]
                    yield step * accum + a, streams[0][0], _collate(samples)

    def _slot_samples(self, slot: int, first: int, restore: bool):
        """Slot `slot`'s samples from place `first` of its epoch stream on: place p shows copy
        p % R of the (p // R)-th sample of that copy's source slot (`SlotLayout.sources`)."""
        repeats = self.layout.repeats
        copies = [self._source_samples(source, copy, (first - copy + repeats - 1) // repeats, restore)
                  for copy, source in enumerate(self.layout.sources(slot))]
        # the copy streams in the order places first, first + 1, ... take them, round and round
        turn = [copies[(first + i) % repeats] for i in range(repeats)]
        return itertools.chain.from_iterable(zip(*turn))

    def _source_samples(self, source: int, copy: int, first: int, restore: bool):
        """Copy `copy` of source slot `source`'s samples from its `first` on."""
        ids, stride, phase = self._plan(self.layout.slots, source, True)
        name = f"{self.seed}:{self.epoch}:{source}"
        buffer = max(1, self.shuffle_buffer // self.layout.repeats)
        shuffled = self._cycled(ids, stride, phase, random.Random(name), buffer)
        return self._samples(itertools.islice(shuffled, first, None), ids, stride, first, name, restore, copy)


def _sample_seed(name: str | None, copy: int = 0) -> int | None:
    """The seed of a sample's augmentation, from its place in the epoch (`name`) and, for repeated
    augmentation, which copy it is, so that a resumed epoch augments each sample exactly as an
    uninterrupted one; None: no seeding (evaluation)."""
    if name is None:
        return None
    return zlib.crc32((f"{name}:copy{copy}" if copy else name).encode())


def _collate(batch):
    # default_collate stacks into shared memory inside a worker: the batch crosses to the
    # trainer's process without the extra copy that pickling a plain tensor makes.
    # A tuple is an image with its RandAugment draws (`randaugment_device.RandAugmented`):
    # default_collate stacks each field.
    tensors = isinstance(batch[0][0], (torch.Tensor, tuple))
    images = default_collate([b[0] for b in batch]) if tensors else [b[0] for b in batch]
    labels = torch.tensor([b[1] for b in batch])
    return (images, labels, [b[2] for b in batch]) if len(batch[0]) == 3 else (images, labels)


def _joined(pieces: list[tuple]) -> tuple:
    """One micro-batch from its slots' pieces, in slot order."""
    if len(pieces) == 1:
        return pieces[0]
    images = [p[0] for p in pieces]
    if isinstance(images[0], tuple):  # images with their RandAugment draws: each field joined
        joined_images = type(images[0])(*(torch.cat(field) for field in zip(*images)))
    elif isinstance(images[0], torch.Tensor):
        joined_images = torch.cat(images)
    else:
        joined_images = [i for p in images for i in p]
    joined = [joined_images, torch.cat([p[1] for p in pieces])]
    return tuple(joined + ([[k for p in pieces for k in p[2]]] if len(pieces[0]) == 3 else []))


class WdsLoader(EpochLoader):
    """Batches of one rank. Training: `len(loader)` batches per epoch on every rank, in the order of
    the run's slot layout, resumable through `state_dict()` on any world size that divides its
    units; evaluation (`train=False`): each sample once across ranks."""

    def __init__(self, shards: ShardSet, batch_size: int, rank: int = 0, world_size: int = 1,
                 workers: int = 2, seed: int = 0, transform: Callable | None = None,
                 train: bool = True, shuffle_buffer: int = 2000, with_keys: bool = False,
                 decode_min_side: int = 0, global_batch: int = 0, slots: int = 0, repeated_aug: int = 1):
        """`batch_size`: the micro batch; `global_batch`: the samples of an optimizer step (0:
        `batch_size x world_size`, no accumulation); `slots`: the slot count (0: the checkpoint's
        when a state is loaded, else `slots.default_slots` for this many shards); `repeated_aug`:
        the copies of each training sample (module docstring). `decode_min_side`: the smallest
        shorter side the transform needs (see `transforms.min_decode_side`); 0 decodes every
        image at full size."""
        self.global_batch = global_batch or batch_size * world_size
        if train and shards.num_samples < self.global_batch:
            raise ShardFolderError(f"{shards.num_samples} samples cannot give one global batch of "
                                   f"{self.global_batch} ({world_size} ranks x {batch_size} x accumulation)")
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.workers, self.seed, self.transform, self.train = workers, seed, transform, train
        self.shuffle_buffer, self.with_keys = shuffle_buffer, with_keys
        self.decode_min_side, self.slots, self.repeated_aug = decode_min_side, slots, repeated_aug
        self.layout = (SlotLayout.make(self.global_batch, batch_size, slots, len(shards.urls), repeated_aug)
                       if train else None)
        self.accum = self.layout.accumulation(world_size) if train else 1
        self._start_position()
        self._damaged = multiprocessing.Value("q", 0)

    @property
    def damaged(self) -> int:
        """Damaged samples and shard read errors skipped so far by this rank (all workers)."""
        return self._damaged.value

    def __len__(self) -> int:
        if self.train:
            return self.shards.num_samples // self.global_batch * self.accum
        raise TypeError("an evaluation loader's length differs between ranks")

    @property
    def samples_delivered(self) -> int:
        """Samples this rank has delivered in the current epoch."""
        return self.batches_done * self.batch_size

    def state_dict(self) -> dict:
        """The global position (the same on every rank): epoch, steps done in it, and the layout."""
        steps, partial = divmod(self.batches_done, self.accum)
        return {**super().state_dict(), "steps_done": steps, "partial_batches": partial,
                "global_batch": self.global_batch, "slots": self.layout.slots, "repeated_aug": self.repeated_aug}

    def load_state_dict(self, state: dict) -> None:
        if "slots" not in state:  # saved before slot layouts: nothing to continue exactly
            raise LoaderStateError(f"a loader state without a slot layout (epoch {state['epoch']}) cannot "
                                   f"be continued in the same order; resume on the world size it was saved "
                                   f"with, with the cvtkit that saved it")
        if self.slots and self.slots != state["slots"] or state["global_batch"] != self.global_batch:
            raise LoaderStateError(f"data.slots={self.slots or 'default'} with global batch {self.global_batch}: "
                                   f"the checkpoint's sample order has {state['slots']} slots and global batch "
                                   f"{state['global_batch']}; leave data.slots unset or set it to {state['slots']}")
        saved = state.get("repeated_aug", 1)  # a state from before it: no copies
        if saved != self.repeated_aug and (state["steps_done"] or state["partial_batches"]):
            raise LoaderStateError(f"data.repeated_aug={self.repeated_aug}: the checkpoint stopped inside an epoch "
                                   f"drawn with data.repeated_aug={saved}, which another count would continue with "
                                   f"samples repeated or skipped; resume with data.repeated_aug={saved} (another "
                                   f"count can start at an epoch boundary)")
        if state["partial_batches"] and state["world_size"] != self.world_size:
            raise LoaderStateError(f"the loader state was saved {state['partial_batches']} micro-batches into "
                                   f"a step, which only the same {state['world_size']} ranks can continue")
        self.layout = SlotLayout.make(self.global_batch, self.batch_size, state["slots"], repeats=self.repeated_aug)
        self.accum = self.layout.accumulation(self.world_size)
        self.epoch, self.batches_done = state["epoch"], state["steps_done"] * self.accum + state["partial_batches"]

    def _epoch_batches(self, epoch: int, skip: int):
        common = (self.shards, self.rank, self.seed, epoch, self.transform, self.shuffle_buffer,
                  self.with_keys, self.decode_min_side, self._damaged)
        if not self.train:
            yield from self._loader(_EvalStream(self.world_size, *common), self.workers, self.batch_size)
            return
        steps = self.shards.num_samples // self.global_batch
        pieces = _TrainPieces(self.layout, self.world_size, steps, skip, *common)
        pending: dict[int, dict[int, tuple]] = {}
        following = skip
        for batch, first, part in self._loader(pieces, min(self.workers, self.accum * self.layout.per_unit), None):
            pending.setdefault(batch, {})[first] = part
            while sum(len(p[1]) for p in pending.get(following, {}).values()) == self.batch_size:
                parts = pending.pop(following)
                yield _joined([parts[j] for j in sorted(parts)])
                following += 1

    def _loader(self, dataset, workers: int, batch_size: int | None):
        # Its own generator: creating the loader must not draw from the trainer's global RNG,
        # or a resumed run's dropout and mixup would differ from an uninterrupted one.
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                          collate_fn=_collate if batch_size else None,
                          generator=torch.Generator().manual_seed(self.seed))
