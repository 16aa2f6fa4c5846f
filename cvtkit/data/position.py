"""The one contract of the training loaders (webdataset, ffcv, DALI): a position in the stream of
epochs that survives a restart.

- every rank delivers `len(loader)` batches per epoch;
- `state_dict()` at any batch boundary holds (epoch, batches done in it, world size, batch size,
  seed); `load_state_dict()` continues from there;
- an epoch always ends by advancing to the next one, also when it had no batch left to deliver:
  a position saved right after an epoch's last batch resumes with the next epoch's first batch
  (a loader that returned without advancing would leave `while True: yield from loader` spinning
  forever without a batch).

A subclass says how many batches an epoch has (`__len__`) and yields the batches of one epoch
after the first `skip` (`_epoch_batches`); this base alone moves the position.
"""
from __future__ import annotations

from typing import Iterator

from cvtkit.errors import CvtkitError


class LoaderStateError(CvtkitError):
    """A checkpoint's loader position that this run cannot continue in the same sample order."""


def resume_position(state: dict, world_size: int, batch_size: int, loader: str) -> tuple[int, int]:
    """(epoch, batches already delivered) for a loader state saved with the same layout. A loader
    whose order is cut by rank (ffcv, DALI) cannot continue it on another one: one-line error."""
    if state["world_size"] == world_size and state["batch_size"] == batch_size:
        return state["epoch"], state["batches_done"]
    raise LoaderStateError(f"{loader} deals each epoch's samples by rank, so a position saved on "
                           f"{state['world_size']} ranks x micro batch {state['batch_size']} continues "
                           f"in the same order only there (this run: {world_size} x {batch_size}); "
                           f"resume there, or train with data.format wds, whose order does not depend on it")


class EpochLoader:
    """Base of the training loaders: the position (`epoch`, `batches_done`) and its resume rule.
    Subclasses set `batch_size`, `world_size`, `seed` and `train`, call `_start_position()`, and
    implement `__len__` and `_epoch_batches`. An evaluation loader (`train=False`) has no
    position: each iteration is one pass over its share."""
    batch_size: int
    world_size: int
    seed: int
    train: bool

    def _start_position(self) -> None:
        self.epoch, self.batches_done = 0, 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator:
        """The batches of `epoch` after its first `skip` (evaluation: `skip` is 0)."""
        raise NotImplementedError

    def _epoch_ended(self) -> None:
        """Called once an epoch is over, before the position moves on (e.g. to drop a pipeline)."""

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = resume_position(state, self.world_size, self.batch_size, type(self).__name__)

    def __iter__(self):
        if not self.train:
            yield from self._epoch_batches(self.epoch, 0)
            return
        if self.batches_done < len(self):
            for batch in self._epoch_batches(self.epoch, self.batches_done):
                self.batches_done += 1
                yield batch
                if self.batches_done == len(self):
                    break
        self._epoch_ended()
        self.epoch, self.batches_done = self.epoch + 1, 0
