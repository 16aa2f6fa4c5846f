"""What the ranks agree on about their steps, kept on the device between the host's decisions.

Reading a device value (`.item()`, `float(t)`, `if t:`) makes the CPU wait until the GPU has run
everything queued so far, so that it cannot queue the next step meanwhile. So each step only adds
its figures to a device tensor and all-reduces them there (one small all-reduce, no read); the
host reads them, in one transfer, only on the steps where it has to decide something anyway (a
log step, a save, `checkpoint.stop_at_step`). Between those, the loss sums and the run of
non-finite steps are counted on the device:

    agreement.add_loss(loss)                  # per micro-batch
    agreement.end_step(step, stop, damaged)    # per optimizer step: the all-reduce
    report = agreement.read(new_window=True)   # on a decision step: the one host read

A stop signal or a run of `engine.max_nonfinite` non-finite steps therefore takes effect at the
next decision step, on every rank at the same step. Until then a non-finite step costs nothing:
bf16 and fp16 skip its update, and weights that are not finite are never saved (a save is a
decision step, and `Trainer._save` checks the masters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# The per-step vector, summed over ranks: the sum of the finite micro-batch losses, how many
# micro-batches had a finite loss, how many had not, damaged samples, then per stop signal the
# ranks that received it (`StopSignals.flags`).
_LOSS, _FINITE, _NONFINITE, _DAMAGED, _STOP = range(5)
# The running state: window sums (loss, finite count, non-finite steps), the current run of
# non-finite steps, the longest run since the last read and the step it ended at, then the last
# step's damaged figure and signal flags.
_W_LOSS, _W_FINITE, _W_NONFINITE, _RUN, _WORST, _WORST_STEP, _W_DAMAGED, _W_STOP = range(8)


@dataclass
class StepReport:
    """What every rank agreed on; the window is the steps since the last log step."""
    loss: float  # mean of the finite micro-batch losses over ranks and the window's steps; nan if none
    steps: int  # optimizer steps in the window
    nonfinite_steps: int  # steps of the window on which some rank saw a non-finite loss
    nonfinite_run: int  # the longest run of consecutive non-finite steps since the last read
    nonfinite_last: int  # the step that run ended at (0: none)
    signal_flags: list[float]  # per stop signal, the ranks that received it (`StopSignals.agreed`)
    damaged: int  # samples or shards the loaders of all ranks skipped so far


class StepAgreement:
    """The device-side sums behind `StepReport`; every rank calls each method at the same steps."""

    def __init__(self, device: torch.device, num_signals: int):
        self.step_sums = torch.zeros(_STOP + num_signals, dtype=torch.float64, device=device)
        self.state = torch.zeros(_W_STOP + num_signals, dtype=torch.float64, device=device)
        self.steps = 0
        self.last_loss = torch.full((), float("nan"), dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (a 0-d tensor), without reading it."""
        loss = loss.detach().to(self.step_sums.device, torch.float64)
        finite = torch.isfinite(loss)
        self.step_sums[_LOSS] += torch.where(finite, loss, 0.0)
        self.step_sums[_FINITE] += finite
        self.step_sums[_NONFINITE] += ~finite

    def end_step(self, step: int, signal_flags: list[float], damaged: int) -> None:
        """Close optimizer step `step`: the ranks' sums (one all-reduce), folded into the window."""
        sums, state = self.step_sums, self.state
        # host values written into the device tensor: no read
        sums[_STOP:] = torch.tensor(signal_flags, dtype=torch.float64)
        sums[_DAMAGED] = float(damaged)
        dist.all_reduce(sums)
        bad = sums[_NONFINITE] > 0
        # This step's mean finite loss over the ranks, for the spike guard (`step_loss()`).
        self.last_loss = torch.where(sums[_FINITE] > 0, sums[_LOSS] / sums[_FINITE].clamp(min=1), float("nan"))
        state[_W_LOSS:_W_NONFINITE] += sums[_LOSS:_NONFINITE]
        state[_W_NONFINITE] += bad
        state[_RUN] = (state[_RUN] + 1) * bad
        state[_WORST_STEP].masked_fill_(bad & (state[_RUN] >= state[_WORST]), step)
        state[_WORST] = torch.maximum(state[_WORST], state[_RUN])
        state[_W_DAMAGED] = sums[_DAMAGED]
        state[_W_STOP:] = sums[_STOP:]
        sums.zero_()
        self.steps += 1

    def step_loss(self) -> float:
        """The last step's loss, mean over ranks (nan if none was finite): a host read, for the
        spike guard only."""
        return self.last_loss.item()

    def read(self, new_window: bool) -> StepReport:
        """The figures so far (the one host read). The longest non-finite run starts again from
        the current one (a run still going on carries over); with `new_window` (a log step) the
        loss sums and step counts start again too."""
        v = self.state.tolist()
        finite = v[_W_FINITE]
        report = StepReport(loss=v[_W_LOSS] / finite if finite else float("nan"), steps=self.steps,
                            nonfinite_steps=int(v[_W_NONFINITE]), nonfinite_run=int(v[_WORST]),
                            nonfinite_last=int(v[_WORST_STEP]), signal_flags=v[_W_STOP:],
                            damaged=int(v[_W_DAMAGED]))
        self.state[_WORST] = self.state[_RUN]
        if new_window:
            self.state[_W_LOSS:_RUN] = 0.0
            self.steps = 0
        return report
