"""Ranks whose launcher died stop at once, without writing anything more.

``kill -9`` of ``torchrun`` (or of the ``deepspeed`` launcher) leaves its workers running, each
in its own session, so they keep training and saving next to whatever is started in their place.
A rank started by a launcher remembers its parent and a daemon thread checks every
:data:`INTERVAL_S` whether it changed (the orphan was re-parented to init or a subreaper); if so,
the process leaves with :data:`EXIT_ORPHANED` through ``os._exit``: no checkpoint, no log line,
no exit handlers. A save it was in the middle of stays without its manifest, which no resume
picks. A process started by hand (``launcher == "single"``) is not watched: its parent is a
shell, which may exit on purpose (``nohup``).
"""

from __future__ import annotations

import os
import sys
import threading
import time

INTERVAL_S = 0.5
EXIT_ORPHANED = 70
"""``EX_SOFTWARE``; nobody waits for it (the launcher is gone), it shows in ``ps`` and logs."""


def _watch(parent: int) -> None:
    while True:
        time.sleep(INTERVAL_S)
        if os.getppid() != parent:
            print(f"omni-ds: the launcher (pid {parent}) is gone; pid {os.getpid()} stops "
                  "without writing", file=sys.stderr, flush=True)  # fmt: skip
            os._exit(EXIT_ORPHANED)


def watch_launcher(launcher: str) -> None:
    """Start the watch for a rank that ``launcher`` (``LaunchEnv.launcher``) started."""
    if launcher == "single":
        return
    threading.Thread(target=_watch, args=(os.getppid(),), daemon=True, name="launcher").start()
