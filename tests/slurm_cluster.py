"""A real SLURM cluster for the tests: ``slurm/local_cluster.sh`` with 2 simulated nodes.

``LocalCluster.start()`` installs slurm + munge when they are missing (apt-get, as root),
brings the cluster up on free ports and returns a handle; ``stop()`` tears it down by recorded
PID. Without the packages and without root the tests are skipped, except under ``CI=true``, where
that is a failure: CI must run them.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import LAUNCH_VARS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"


def _installed() -> bool:
    # The paths local_cluster.sh runs (root's PATH has /usr/sbin, a user's often not).
    daemons = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch")
    return all(os.access(path, os.X_OK) for path in daemons)


def ensure_installed() -> None:
    """Install slurm + munge when missing (root), else skip (fail under CI=true)."""
    if _installed():
        return
    if os.geteuid() != 0:
        reason = "slurm-wlm/munge are not installed and installing them needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the SLURM tests as root")
        pytest.skip(f"{reason}: run `sudo slurm/local_cluster.sh install`")
    result = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True)
    if result.returncode != 0 or not _installed():
        pytest.fail(f"installing slurm failed:\n{result.stdout}\n{result.stderr}")


def _free_port_block(n: int) -> int:
    """A port P with P..P+n free, below Linux's ephemeral range and the jobs' MASTER_PORTs."""
    for _ in range(100):
        base = random.randrange(10000, 19000)
        try:
            for port in range(base, base + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports in 10000-19000")


class LocalCluster:
    """A running local cluster; every client call gets this cluster's ``SLURM_CONF``."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory = directory
        self.env = env

    @classmethod
    def start(cls, nodes: int = 2) -> LocalCluster:
        ensure_installed()
        # Not pytest's tmp_path: munged needs every parent of its socket searchable by all.
        directory = Path(tempfile.mkdtemp(prefix="omni-ds-slurm-", dir="/tmp"))
        directory.chmod(0o755)
        # sbatch exports everything: the test process's launch variables must not reach jobs.
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env.update(
            SLURM_LOCAL_DIR=str(directory),
            SLURM_LOCAL_PORT=str(_free_port_block(nodes)),
            SLURM_NNODES=str(nodes),
            SLURM_CONF=str(directory / "etc" / "slurm.conf"),
            # Two ranks of a 2-core machine on two "nodes": one thread each.
            OMP_NUM_THREADS="1",
            OMNI_DS=str(Path(sys.executable).with_name("omni-ds")),
            OMNI_DS_PYTHON=sys.executable,
        )
        cluster = cls(directory, env)
        up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True)
        if up.returncode != 0:
            cluster.stop()
            pytest.fail(f"local SLURM did not come up:\n{up.stdout}\n{up.stderr}")
        return cluster

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "down"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.directory, ignore_errors=True)

    def run(self, *argv: str, timeout: float = 120) -> str:
        """A SLURM client command (sbatch, srun, scontrol, ...) from the repo root; its stdout."""
        result = subprocess.run(
            argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")  # fmt: skip
        return result.stdout

    def sbatch(self, *argv: str) -> str:
        return self.run("sbatch", "--parsable", *argv).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StartTime, ...)."""
        fields = {}
        for item in self.run("scontrol", "-o", "show", "job", job_id).split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with the job record on a timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {states} after {timeout} s: {job}")
            time.sleep(0.3)
