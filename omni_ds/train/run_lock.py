"""One training per run directory: an exclusive lock, taken before anything is written there.

Two trainings in one run dir (a second launch by mistake, or the orphaned workers of a killed
launcher next to its restart) interleave their saves and metrics: ``latest`` goes backwards and
steps are logged twice. Rank 0 holds ``RUN/omni_ds.lock`` for the whole run:

- a POSIX record lock (``lockf``) on it, which the kernel drops when the holder dies (``kill -9``
  included), which forked data-loader workers do not inherit, and which NFS passes between
  hosts; and
- a JSON record of the holder (host, pid and its start time, SLURM job id and restart count),
  refreshed every :data:`HEARTBEAT_S` seconds, for the messages and for file systems where
  the lock does not reach other hosts.

A lock that is free is *stale*, and taken over, when its record says it was released,
or that its holder was an earlier attempt of this SLURM job (a requeued restart), or a process on
this host that is gone, or one on another host whose heartbeat stopped over :data:`STALE_S` ago.
A lock that is held is waited for up to ``wait_s`` (the orphans of a killed launcher stop within
half a second, :mod:`omni_ds.train.launcher_watch`), then refused with :class:`RunDirInUse`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "omni_ds.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunDirInUse(RuntimeError):
    """Another training holds the run directory; the message names it and what to do."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(record: dict) -> bool:
    """Whether the holder ``record`` describes (on this host) still runs: its pid exists with
    the recorded start time (a pid reused by another process does not count)."""
    pid = int(record.get("pid", 0))
    if pid <= 0:
        return False
    if not Path("/proc/self/stat").exists():  # no procfs: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    started = _start_time(pid)
    return started is not None and started == record.get("pid_start", started)


def _describe(record: dict) -> str:
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on host {record.get('host')}{job}, since {since}"


def holder_record() -> dict:
    """This process as a lock holder."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "started": time.time(), "argv": sys.argv}  # fmt: skip


def stale_reason(record: dict, age_s: float, me: dict) -> str | None:
    """Why the unlocked record of an earlier holder no longer holds the run dir, or None when it
    may still (another host's process whose heartbeat is recent)."""
    if not record or record.get("released"):
        return "released"
    if record.get("slurm_job_id") and record["slurm_job_id"] == me["slurm_job_id"]:
        return f"an earlier attempt of SLURM job {me['slurm_job_id']} (requeued)"
    if record.get("host") == me["host"]:
        return None if _alive(record) else "its process is gone"
    if age_s > STALE_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    def __init__(self, run_dir: Path, wait_s: float = 2.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.wait_s = wait_s
        self.me = holder_record()
        self._fd: int | None = None
        self._stop = threading.Event()

    def _read(self) -> tuple[dict, float]:
        try:
            text = os.pread(self._fd, 1 << 16, 0).decode()
            return (json.loads(text) if text.strip() else {}), time.time() - os.fstat(
                self._fd
            ).st_mtime
        except ValueError:
            return {}, 0.0

    def _write(self, record: dict) -> None:
        data = json.dumps(record, indent=1).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _lock(self) -> bool:
        """Try the record lock once; True when this process holds it, or the file system has
        no locks (then the record alone decides)."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return True
            raise

    def acquire(self) -> str | None:
        """Take the lock; returns the note to print when a stale one was taken over. Raises
        :class:`RunDirInUse` when another training holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            locked = self._lock()
            record, age = self._read()
            reason = stale_reason(record, age, self.me) if locked else None
            if reason is not None:
                break
            if time.monotonic() > deadline:
                os.close(self._fd)
                self._fd = None
                holder = _describe(record) if record else "another process"
                raise RunDirInUse(
                    f"{self.path.parent} is in use by another training ({holder}); two runs in "
                    "one run dir overwrite each other's checkpoints and metrics. Wait for it or "
                    f"stop it, or pick another train.run_dir; if it is surely gone, delete "
                    f"{self.path}"
                )
            if locked:  # a live holder whose lock does not reach us: let go while waiting
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            time.sleep(0.25)
        self._write(self.me)
        threading.Thread(target=self._heartbeat, daemon=True, name="run-lock").start()
        if reason == "released":
            return None
        return f"took over the stale lock of {_describe(record)}: {reason}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the run dir went away under the run; its writes will say so
                return

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        self._write({**self.me, "released": True, "ended": time.time()})
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, wait_s: float = 2.0) -> Iterator[None]:
    """Collective: rank 0 takes the run dir's lock for the ``with`` block; every rank raises
    :class:`RunDirInUse` when it cannot."""
    from omni_ds import dist

    lock, outcome = None, None
    if dist.rank() == 0:
        lock = RunLock(run_dir, wait_s)
        try:
            note = lock.acquire()
            if note is not None:
                print(f"{run_dir}: {note}", file=sys.stderr, flush=True)
        except RunDirInUse as e:
            outcome = str(e)
        except OSError as e:  # every rank must hear of it, or the others wait in the broadcast
            outcome = f"cannot lock {lock.path}: {e}"
    outcome = dist.broadcast_object(outcome)
    if outcome is not None:
        raise RunDirInUse(outcome)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
