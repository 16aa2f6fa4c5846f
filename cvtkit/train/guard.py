"""The loss-spike rollback: a step whose loss (mean over the ranks) or gradient norm exceeds
`guard.spike_factor` x the median of the previous `guard.spike_window` steps sends the run back to
the newest complete checkpoint older than it, past the batches from there to the spike.

    guard = SpikeGuard(cfg.guard)
    spike = guard.check(step, loss, grad_norm)     # every step while spike_factor > 0
    if spike: skipped = roll_back(trainer, spike)   # then the loop takes new batches

What the large published runs do by hand (restart from an earlier checkpoint, skip the data that
caused it), with nobody watching. The loader is moved to where it stood at the spike, so no sample
of the window is trained on again in this epoch; the step counter (and so the schedule), the
weights, optimizer, EMA and RNG come back from the checkpoint. `guard.max_rollbacks` per epoch
bound it; the count is part of the trainer's checkpointed state and survives the rollback itself.

With `data.trace` on, the rollback's line of `events.jsonl` lists the keys of the steps it undid
(`skipped_keys`, in the order trained), read back from `trace.jsonl`: in full, not as a pointer
into that file, because a resume from an older checkpoint rewrites those lines; the list is as
large as the trace's own lines of those steps (the steps since the checkpoint it goes back to),
which a traced run writes anyway.

The check needs each step's loss on the host: one read per step while the guard is on (the loop
reads nothing back otherwise, `agreement.py`), which is why it is off unless a recipe turns it on.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from cvtkit.checkpoint import complete_tags, read_meta, tag_for
from cvtkit.errors import CvtkitError


class LossSpikes(CvtkitError):
    """Loss spikes the guard could not heal (too many in an epoch, or no checkpoint before one)."""
    exit_code = 1


@dataclass
class Spike:
    step: int
    what: str  # "loss" or "grad_norm"
    value: float
    median: float


class SpikeGuard:
    """The running windows of the loss and gradient norm, and the rollbacks of each epoch."""

    def __init__(self, cfg):
        self.factor, self.window, self.max_rollbacks = cfg.spike_factor, cfg.spike_window, cfg.max_rollbacks
        self.history = {"loss": deque(maxlen=self.window), "grad_norm": deque(maxlen=self.window)}
        self.rollbacks: dict[int, int] = {}  # epoch -> rollbacks in it

    @property
    def on(self) -> bool:
        return self.factor > 0

    def check(self, step: int, loss: float, grad_norm: float | None) -> Spike | None:
        """A spike at `step`, or None, after which the values join their windows. A non-finite
        value is neither (non-finite losses are `engine.max_nonfinite`'s); a window judges only
        once full."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for what, value in values.items():
            window = self.history[what]
            if value is None or value != value or value in (float("inf"), float("-inf")):
                continue
            if len(window) == self.window:
                median = statistics.median(window)
                if value > self.factor * median:
                    return Spike(step, what, value, median)
        for what, value in values.items():
            if value is not None and abs(value) != float("inf") and value == value:
                self.history[what].append(value)
        return None

    def state_dict(self) -> dict:
        return {"rollbacks": dict(self.rollbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = {int(k): v for k, v in state.get("rollbacks", {}).items()}


def roll_back(trainer, spike: Spike) -> dict:
    """Load the newest complete checkpoint older than `spike.step` into `trainer` (every rank)
    and move its loader back to where it stood at the spike; returns the event's fields."""
    guard, epoch = trainer.guard, (spike.step - 1) // trainer.steps_per_epoch
    where = (f"step {spike.step}: {spike.what} {spike.value:.4g} > guard.spike_factor "
             f"{guard.factor:g} x the median {spike.median:.4g} of the {guard.window} steps before")
    done = guard.rollbacks.get(epoch, 0)
    if done >= guard.max_rollbacks:
        raise LossSpikes(f"{where}, and epoch {epoch} already had guard.max_rollbacks={done} rollbacks; "
                         f"stopping (the newest checkpoint is intact): lower optim.lr or look at the data")
    older = [t for t in complete_tags(trainer.ckpt_dir) if t < tag_for(spike.step)]
    if not older or read_meta(trainer.ckpt_dir / older[-1])["world_size"] != trainer.world:
        raise LossSpikes(f"{where}, and {trainer.ckpt_dir} has no complete checkpoint of this run's "
                         f"{trainer.world} ranks older than it to roll back to")
    at_spike, counts = trainer.loader.state_dict(), guard.state_dict()
    trainer.checkpointer.load(older[-1], trainer._states(), universal=False)
    trainer.loader.load_state_dict(at_spike)  # past the window: its batches are not trained on again
    guard.load_state_dict(counts)  # the checkpoint's trainer state had the counts of its own time
    guard.rollbacks[epoch] = done + 1
    trainer.last_saved = trainer.step
    return {"step": spike.step, spike.what: spike.value, "median": spike.median,
            "checkpoint": str(trainer.ckpt_dir / older[-1]), "resumed_at": trainer.step,
            "steps_skipped": spike.step - trainer.step, "rollbacks_this_epoch": done + 1,
            "loader_at": {"epoch": at_spike["epoch"], "batches_done": at_spike["batches_done"]}}


def heal(trainer) -> bool:
    """The guard's check of the step just taken (the loss read back, DeepSpeed's gradient norm);
    after a spike, the rollback, its event (`events.jsonl`, tensorboard) and a line on rank 0.
    Returns whether it rolled back (every rank alike: the loss and norm are the ranks' own sums)."""
    norm = trainer.engine.get_global_grad_norm()
    spike = trainer.guard.check(trainer.step, trainer.agreement.step_loss(), None if norm is None else float(norm))
    if spike is None:
        return False
    event = roll_back(trainer, spike)
    if trainer.trace.enabled:
        event["skipped_keys"] = trainer.trace.keys_since(event["resumed_at"])
    trainer.runlog.event("rollback", event)
    trainer._info(f"step {spike.step}: {spike.what} {spike.value:.4g} is over guard.spike_factor "
                  f"{trainer.guard.factor:g} x the median {spike.median:.4g}; rolled back to "
                  f"{event['checkpoint']} (step {event['resumed_at']}), skipping its {event['steps_skipped']} "
                  f"steps' batches (rollback {event['rollbacks_this_epoch']} of epoch)")
    return True
