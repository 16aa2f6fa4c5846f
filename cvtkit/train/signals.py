"""Stop signals (preemption, time limits) turned into a flag that the loop reads at step boundaries."""
from __future__ import annotations

import signal


class StopSignals:
    """SIGUSR1 / SIGTERM (and SIGUSR2, submitit's) only set a flag here; the loop saves at the next
    step boundary, where all ranks agree, also when the signal reached one rank only. The previous
    handler of the agreed signal (submitit's requeue, for instance) is kept and called after the
    save on every rank, outside the signal context."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        for sig in signals:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def flags(self) -> list[float]:
        """Per stop signal, 1.0 if this rank received it: what the ranks sum to agree."""
        return [float(sig == self.received) for sig in self.signals]

    def agreed(self, summed: list[float]) -> int | None:
        """The signal every rank acts on, from the summed `flags`: the first (in the order above)
        that any rank received; None when none did."""
        return next((sig for sig, count in zip(self.signals, summed) if count > 0), None)

    def hand_over(self, signum: int | None) -> None:
        """Call the handler that was there before ours for the agreed signal, whether or not this
        rank received it (e.g. submitit's checkpoint-and-requeue, which acts on rank 0 only)."""
        handler = self.previous.get(signum)
        if callable(handler):
            self.restore()
            handler(signum, None)
