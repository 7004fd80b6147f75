"""Preemption: SIGUSR1/SIGTERM become a checkpoint at the next step boundary, then exit 75.

SLURM sends ``--signal=B:USR1@<s>`` (or SIGTERM on preemption) to the job's processes, not
necessarily to every rank at the same moment. A rank that acted on its own flag alone would enter
``save_checkpoint`` (collective) while the others start the next step's all-to-all: a hang. So the
flag only records the signal, and :func:`omni_ds.dist.agree` combines it with the other per-step flags in one
``all_reduce(MAX)``: every rank stops at the same step.

``omni-ds train`` installs :class:`StopRequest` first, before its imports and the start-up
(seconds, during which SLURM may already signal), so that an early signal is a stop request, not
the end of the process; a stop agreed before the first step exits 75 without a checkpoint. It is
also in place before data-loader workers fork: they inherit the handler, so a signal that reaches
them only sets a flag in their own memory instead of killing them.
"""

from __future__ import annotations

import signal

EXIT_REQUEUE = 75
"""Exit code after a signal-triggered checkpoint (``EX_TEMPFAIL``); slurm/train.sbatch requeues."""
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records whether a stop signal arrived; ``with StopRequest() as stop: ... stop.requested``."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
