"""omni_ds.train.run_lock: one training per run dir; stale locks and requeued SLURM jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import child_pythonpath

from omni_ds.train.run_lock import LOCK_FILE, RunDirInUse, RunLock


def _holder(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """Another process that takes the lock, says so, and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from omni_ds.train.run_lock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), **(env or {})}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_holder_is_refused_then_a_dead_holder_is_stale(tmp_path):
    holder = _holder(tmp_path)
    try:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        with pytest.raises(RunDirInUse, match=f"in use by another training \\(pid {holder.pid}"):
            RunLock(tmp_path, wait_s=0.5).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path, wait_s=0.5)
    note = lock.acquire()
    assert note.startswith(f"took over the stale lock of pid {holder.pid}")
    assert note.endswith("its process is gone")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["released"] is True
    again = RunLock(tmp_path, wait_s=0.5)
    assert again.acquire() is None  # a released lock is simply taken
    again.release()


def test_another_hosts_lock_holds_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
    """A record from another node whose heartbeat is recent (the lock itself may not reach
    across hosts): refused, except by a requeued restart of the same SLURM job."""
    record = {"host": "node-elsewhere", "pid": 4242, "slurm_job_id": "777", "started": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunDirInUse, match="pid 4242 on host node-elsewhere, SLURM job 777"):
        RunLock(tmp_path, wait_s=0.3).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = RunLock(tmp_path, wait_s=0.3)
    assert "an earlier attempt of SLURM job 777 (requeued)" in lock.acquire()
    lock.release()
