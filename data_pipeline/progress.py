"""Progress of long data work (indexing, sharding): a tqdm bar on a terminal, plain lines in logs.

A bar's carriage returns turn a batch job's log into one unreadable line, so when stderr is not a
terminal the same progress is written as ``DESC: 3/10 shard`` lines, at most one per
:data:`LINE_EVERY` seconds, plus the last one.
"""

from __future__ import annotations

import sys
import time

LINE_EVERY = 10.0


class _Lines:
    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done == self.total or now - self._last >= LINE_EVERY:
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}", file=sys.stderr, flush=True)
            self._last = now

    def close(self) -> None:
        return None


class _Off:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """An object with ``update(n)`` and ``close()``: tqdm on a TTY, plain lines otherwise."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _Lines(total, desc, unit)
