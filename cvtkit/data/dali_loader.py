"""NVIDIA DALI over the same webdataset shards (`data.format: dali`): decoding on the GPU where
there is one (nvJPEG and the hardware JPEG decoders, device "mixed"), DALI's CPU operators
otherwise (`device_id=None`: no GPU needed).

The pipeline, per rank: `fn.readers.webdataset` (index files made on first use by DALI's
`wds2idx` and checked: `dali_index`) -> `fn.decoders.image_random_crop` (the random resized crop
decoded straight from the JPEG: only the crop's region) -> `fn.resize` (bicubic, antialiased) ->
flip -> DALI's RandAugment (`nvidia.dali.auto_aug.rand_augment`) -> uint8 CHW. Random erasing,
normalisation and Mixup/CutMix stay in the trainer, on the device (`device_batch`).

The loader contract, as `WdsLoader`'s:
- shards: each epoch the shard list is shuffled by (seed, epoch) and dealt to the ranks by
  `slot_plan` (one slot per rank: DALI's threads share the rank's reader); with fewer shards than
  ranks, the ranks sharing a shard read disjoint parts of it (DALI's `shard_id`/`num_shards`);
- balance: every rank delivers exactly `len(loader)` batches per epoch; a rank whose shards run
  short wraps around them (DALI's reader is an endless stream), as WdsLoader cycles;
- resume: exact at a batch boundary on the same world size and batch: the state holds DALI's
  own checkpoint of the epoch's pipeline (reader position, shuffle buffer, every random
  operator's state), and the resumed pipeline continues with the very same batches; another
  world size or batch is refused with one line (the order is dealt by rank, unlike WdsLoader's
  slot layout);
- labels: `cls`; a split labelled from each sample's `json` (timm's `train_12k`) is refused
  (`check_labels`);
- validation is not done here: `RunData.val_loader` uses WdsLoader and PIL, pixel-exact to the
  official evaluation, each sample once;
- damage: samples the index check leaves out (not a JPEG, incomplete, a truncated shard) and
  shards that cannot be indexed are skipped and counted (`damaged`); a rank with nothing left is
  a one-line error.

Departures of DALI's augmentation from timm's (the DeiT recipe), stated in BENCHMARKS.md: its
RandAugment applies both chosen ops (timm: each with p=0.5), has no magnitude noise (timm:
mstd 0.5) and uses DALI's op suite and a grey fill; its resize is not PIL's; the crop distribution
is timm's (tests/test_dali_loader.py checks it statistically).
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .dali_index_cache import UnindexableShard, shard_index
from cvtkit.shards import ShardFolderError, ShardSet
from .transforms import AugmentConfig
from .position import EpochLoader
from .slots import slot_plan
from .wds_loader import DamagedData

log = logging.getLogger(__name__)


def rand_augment_args(spec: str) -> dict:
    """timm's `rand-m9-mstd0.5-inc1` -> DALI's rand_augment arguments (n ops, magnitude m of 11
    bins, so that m/10 is timm's magnitude fraction; `inc1`: magnitudes that only strengthen)."""
    if not spec.startswith("rand"):
        raise ValueError(f"auto_augment: DALI runs RandAugment ('rand-...') only, got {spec!r}")
    found = dict(re.findall(r"-(m|n|inc)([\d.]+)", spec))
    return {"n": int(found.get("n", 2)), "m": int(float(found.get("m", 10))), "num_magnitude_bins": 11,
            "monotonic_mag": found.get("inc", "0") != "0"}


def check_labels(shards: ShardSet) -> None:
    """DALI's webdataset reader labels from `cls`: a split labelled from each sample's `json`
    (timm's `train_12k`) would need the json parsed and samples dropped inside the pipeline, which
    DALI's operators cannot do (a batch keeps its size), so it is refused."""
    if shards.alt_label is not None:
        raise ShardFolderError(f"{Path(shards.urls[0]).parent}: split {shards.split!r} takes its labels from "
                               f"each sample's json field {shards.alt_label!r}, which data.format dali cannot "
                               f"read (DALI's reader labels from cls); use data.format wds")


@dataclass
class EpochPlan:
    """What one rank reads in one epoch."""
    paths: list[str]
    index_paths: list[str]
    num_shards: int  # DALI's split of the files between the ranks sharing them
    shard_id: int
    samples: int
    damaged: int


@dataclass
class DaliLoader(EpochLoader):
    """Batches `(uint8 images [B, 3, S, S], int64 labels [B])` of one rank from webdataset
    shards through DALI. Images are on the GPU with device "gpu", on the CPU otherwise."""
    shards: ShardSet
    batch_size: int
    size: int
    rank: int = 0
    world_size: int = 1
    workers: int = 2  # DALI's CPU threads
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 2000
    device: str | None = None  # "gpu" or "cpu"; None: the GPU when there is one
    with_keys: bool = False  # also yield each sample's source file name (from its `json`)

    def __post_init__(self):
        if any("://" in u for u in self.shards.urls):
            raise ShardFolderError(f"{self.shards.urls[0]}: data.format dali reads local shard folders only")
        check_labels(self.shards)
        if self.shards.num_samples < self.world_size * self.batch_size:
            raise ShardFolderError(f"{self.shards.num_samples} samples cannot give one batch of "
                                   f"{self.batch_size} to each of {self.world_size} ranks")
        if self.device is None:
            self.device = "gpu" if torch.cuda.is_available() else "cpu"
        self.train, self.damaged = True, 0
        self._start_position()
        self._pipe, self._checkpoint = None, None

    def __len__(self) -> int:
        return self.shards.num_samples // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._checkpoint = None
        super().set_epoch(epoch)

    def state_dict(self) -> dict:
        """The position, plus DALI's checkpoint of the epoch's pipeline as a uint8 tensor (the run
        folder's pickle scan admits tensors; DALI's serialised protobuf is bytes)."""
        live = self._pipe is not None and self.batches_done > 0
        checkpoint = self._pipe.checkpoint() if live else self._checkpoint
        if isinstance(checkpoint, str):
            checkpoint = checkpoint.encode("latin-1")
        return {**super().state_dict(),
                "dali": None if checkpoint is None else torch.frombuffer(bytearray(checkpoint), dtype=torch.uint8)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # refuses another world size or batch
        saved = state.get("dali")
        if self.batches_done and saved is None:
            log.warning("resuming epoch %d at batch %d without DALI's checkpoint (a WdsLoader state?): "
                        "a fresh pipeline; the sample order is approximate", self.epoch, self.batches_done)
        self._checkpoint = saved.numpy().tobytes() if self.batches_done and saved is not None else None
        self._pipe = None

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's shards for `epoch`, dealt as WdsLoader deals them (one slot per rank)."""
        order = list(range(len(self.shards.urls)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        ids, stride, phase = slot_plan(len(order), self.world_size, self.rank)
        paths, index_paths, samples, damaged = [], [], 0, 0
        for shard in (order[i] for i in ids):
            url = self.shards.urls[shard]
            try:
                index = shard_index(url)
            except UnindexableShard as e:
                log.warning("skipping %s (%d damaged so far on rank %d)", e, self.damaged + damaged + 1, self.rank)
                damaged += 1
                continue
            damaged += index.dropped
            if index.samples:
                paths.append(url)
                index_paths.append(index.path)
                samples += index.samples
        if samples < stride:  # nothing left to read (or less than one sample for each sharer)
            raise DamagedData(f"no readable sample in {', '.join(self.shards.urls[order[i]] for i in ids)}")
        return EpochPlan(paths, index_paths, stride, phase, samples, damaged)

    def _epoch_batches(self, epoch: int, skip: int):
        plan = self.plan(epoch)
        self.damaged += plan.damaged
        self._pipe = self._build(plan, self._checkpoint)
        self._checkpoint = None
        for _ in range(len(self) - skip):
            outputs = self._pipe.run()
            batch = _images(outputs[0]), _labels(outputs[1])
            yield (*batch, _names(outputs[2])) if self.with_keys else batch

    def _epoch_ended(self) -> None:
        # A checkpoint loaded at the very end of an epoch belongs to that epoch, not the next.
        self._pipe = self._checkpoint = None

    def _build(self, plan: EpochPlan, checkpoint):
        from nvidia.dali import pipeline_def
        seed = zlib.crc32(f"{self.seed}:{self.epoch}:{self.rank}".encode()) & 0x7FFFFFFF
        gpu = self.device == "gpu"
        # Conditionals: DALI's RandAugment picks its ops per sample with `if`.
        graph = pipeline_def(_graph, enable_conditionals=True)
        with _quiet_dali_renames():
            pipe = graph(plan, self.augment, self.size, gpu, min(self.shuffle_buffer, plan.samples), seed,
                         self.with_keys,
                         batch_size=self.batch_size, num_threads=max(1, self.workers),
                         device_id=torch.cuda.current_device() if gpu else None, seed=seed,
                         enable_checkpointing=True, checkpoint=checkpoint, prefetch_queue_depth=2)
            pipe.build()
        return pipe


@contextlib.contextmanager
def _quiet_dali_renames():
    """DALI's own RandAugment calls operators DALI has since renamed, and DALI shows those
    deprecation warnings whatever the filters say (it resets them): drop just those lines."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if not (issubclass(category, DeprecationWarning) and "nvidia.dali" in str(message)):
            shown(message, category, *args, **kwargs)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _graph(plan: EpochPlan, aug: AugmentConfig, size: int, gpu: bool, buffer: int, reader_seed: int,
           with_keys: bool):
    """The DALI operators of the recipe (see the module docstring); returns (images, labels[, json])."""
    from nvidia.dali import fn, types
    jpegs, labels, *meta = fn.readers.webdataset(
        paths=plan.paths, index_paths=plan.index_paths, ext=["jpg", "cls"] + (["json"] if with_keys else []),
        missing_component_behavior="error", random_shuffle=True, initial_fill=max(1, buffer),
        shard_id=plan.shard_id, num_shards=plan.num_shards, seed=reader_seed, name="reader")
    decoder = "mixed" if gpu else "cpu"
    interp = types.INTERP_CUBIC if aug.interpolation == "bicubic" else types.INTERP_LINEAR
    flip_p = aug.hflip
    if aug.kind == "deit":
        images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                               random_area=list(aug.scale), random_aspect_ratio=list(aug.ratio),
                                               num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
    elif aug.kind == "finetune":  # resize to (size + margin)^2, then a random crop of size
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.resize(images, resize_x=size + aug.finetune_margin, resize_y=size + aug.finetune_margin,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop(images, crop=(size, size), crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                         crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))
    else:  # "none": the whole image warped to size x size
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
        flip_p = 0.0
    if flip_p > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=flip_p))
    if aug.kind == "deit" and aug.auto_augment:
        from nvidia.dali.auto_aug import rand_augment
        images = rand_augment.rand_augment(images, shape=[size, size], **rand_augment_args(aug.auto_augment))
    return fn.transpose(images, perm=[2, 0, 1]), labels, *meta


def _images(out) -> torch.Tensor:
    """DALI's batch -> a torch tensor that owns its memory (DALI reuses its buffers)."""
    tensor = out.as_tensor()
    if type(tensor).__name__ == "TensorGPU":  # DALI's own copy into a torch tensor, on its stream
        from nvidia.dali.plugin.pytorch import feed_ndarray
        device = torch.device("cuda", torch.cuda.current_device())
        images = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, images, cuda_stream=torch.cuda.current_stream())
        return images
    return torch.from_numpy(np.array(tensor))


def _names(out) -> list[str]:
    import json
    return [json.loads(np.asarray(out[i]).tobytes())["filename"] for i in range(len(out))]


def _labels(out) -> torch.Tensor:
    """The `cls` components (ASCII digits) -> int64 labels."""
    return torch.tensor([int(np.asarray(out[i]).tobytes()) for i in range(len(out))], dtype=torch.int64)
