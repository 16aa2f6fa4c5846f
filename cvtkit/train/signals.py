"""Stop signals (preemption, time limits) turned into a flag that the loop reads at step boundaries."""
from __future__ import annotations

import signal


class StopSignals:
    """SIGUSR1 / SIGTERM (and SIGUSR2, submitit's) only set a flag here; the loop saves at the next
    step boundary, where all ranks agree. The previous handler of the signal that arrived (submitit's
    requeue, for instance) is kept and called after the save, outside the signal context."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)):
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

    def hand_over(self) -> None:
        """Call the handler that was there before ours (e.g. submitit's checkpoint-and-requeue)."""
        handler = self.previous.get(self.received)
        if callable(handler):
            self.restore()
            handler(self.received, None)
