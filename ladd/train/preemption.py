"""Stopping cleanly before a cluster stops you: preemption signals and a wall-clock budget.

SLURM (and most schedulers) send SIGTERM — or the signal asked for with `--signal`, often SIGUSR1 —
some time before they kill a job; torchrun forwards SIGTERM to its workers and SIGKILLs them 30 s
later. `StopRequests` turns such a signal, or `train.max_minutes` running out, into a request that
the loop reads between steps: it finishes the step it is in, every rank agrees (one tiny all-reduce
per step), writes a checkpoint and exits 0, so re-running the same command resumes exactly.
"""

from __future__ import annotations

import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Installs handlers for SIGNALS while it lives (`close()` restores the previous ones)."""

    def __init__(self, max_minutes: float = 0.0, started: float | None = None):
        """`started`: the time.monotonic() the budget counts from (the process's start: loading counts)."""
        self.signal: str | None = None  # the name of the first signal received
        start = time.monotonic() if started is None else started
        self.deadline = start + max_minutes * 60 if max_minutes > 0 else None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        # Only a flag: the step in flight (and any collective in it) finishes normally.
        self.signal = self.signal or signal.Signals(signum).name

    def flags(self) -> list[bool]:
        """[a signal arrived, the wall-clock budget is spent] on this rank."""
        return [self.signal is not None, self.deadline is not None and time.monotonic() >= self.deadline]

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
