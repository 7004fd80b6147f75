"""Run a function or a CLI in N local processes, the way a launcher would, and collect the results.

Every distributed test uses this instead of its own subprocess plumbing:

    results = run_function(my_worker, nprocs=2, args=(cfg_path,))   # my_worker's return per rank
    ranks = run_command(["omni-ds", "train", cfg], nprocs=2)       # RankResult per rank

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT (a fresh free
port per call), its own process session (so a kill reaches its data-loader workers), and log files.
When one rank exits non-zero or the group outlives ``timeout``, every rank is killed at once and
:class:`RankFailure` carries the tail of each rank's stderr.

``python tests/harness.py --worker MODULE QUALNAME IN OUT`` is the per-rank entry of
:func:`run_function`: it imports the test module, calls the function with the pickled arguments and
pickles its return value.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# What a launcher sets per rank; never inherited from the test process.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


class RankFailure(AssertionError):
    """A rank died or the group hung; the message holds every rank's stderr tail."""


@dataclasses.dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pythonpath(*first: Path) -> str:
    """``PYTHONPATH`` for a child Python: ``first`` (default: the repository), then the caller's
    own entries, which hold the dependencies where they were installed with ``pip install
    --target`` (``benchmarks/gpu_check.sh`` on the GPU machine)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*(str(p) for p in first or (REPO,)), *inherited])


def rank_environ(
    rank: int, nprocs: int, port: int, nodes: int = 1, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment torchrun would give ``rank``; ``nodes`` > 1 simulates several hosts."""
    local = nprocs // nodes
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS
    }
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank % local),
        LOCAL_WORLD_SIZE=str(local),
        GROUP_RANK=str(rank // local),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=child_pythonpath(REPO, TESTS),
    )
    env.update(extra or {})
    return env


class RankGroup:
    """N running ranks. Use :meth:`wait`, or :meth:`signal` them first (preemption tests)."""

    def __init__(
        self,
        argv_per_rank: Sequence[Sequence[str]],
        env_per_rank: Sequence[Mapping[str, str]],
        cwd: str | os.PathLike | None = None,
    ):
        self.logdir = Path(tempfile.mkdtemp(prefix="omni-ds-ranks-"))
        self.procs: list[subprocess.Popen] = []
        self._files = []
        for rank, (argv, env) in enumerate(zip(argv_per_rank, env_per_rank)):
            out = open(self.logdir / f"rank{rank}.out", "w+")
            err = open(self.logdir / f"rank{rank}.err", "w+")
            self._files.append((out, err))
            self.procs.append(
                subprocess.Popen(
                    list(argv),
                    env=dict(env),
                    cwd=cwd,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            )

    def signal(self, sig: int, ranks: Sequence[int] | None = None) -> None:
        for rank, p in enumerate(self.procs):
            if (ranks is None or rank in ranks) and p.poll() is None:
                p.send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()

    def _read(self, rank: int) -> tuple[str, str]:
        out, err = self._files[rank]
        out.flush()
        err.flush()
        return (self.logdir / f"rank{rank}.out").read_text(), (
            self.logdir / f"rank{rank}.err"
        ).read_text()

    def _report(self, headline: str) -> str:
        parts = [headline]
        for rank, p in enumerate(self.procs):
            stdout, stderr = self._read(rank)
            parts.append(
                f"--- rank {rank} (exit {p.returncode}) stdout tail ---\n{stdout[-2000:]}\n"
                f"--- rank {rank} stderr tail ---\n{stderr[-4000:]}"
            )
        return "\n".join(parts)

    def wait(self, timeout: float = 300.0, check: bool = True) -> list[RankResult]:
        """Wait for every rank; with ``check``, the first non-zero exit kills the rest and raises."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            failed = [r for r, p in enumerate(self.procs) if p.poll() not in (None, 0)]
            if check and failed:
                self.kill()
                raise RankFailure(self._report(f"rank(s) {failed} failed"))
            if time.monotonic() > deadline:
                self.kill()
                raise RankFailure(
                    self._report(f"ranks still running after {timeout:.0f} s (hang?)")
                )
            time.sleep(0.05)
        results = [RankResult(r, p.returncode, *self._read(r)) for r, p in enumerate(self.procs)]
        if check and any(r.returncode != 0 for r in results):
            raise RankFailure(self._report("rank(s) failed"))
        return results

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for out, err in self._files:
            out.close()
            err.close()


def start_command(
    argv: Sequence[str],
    nprocs: int,
    *,
    nodes: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> RankGroup:
    """Start ``argv`` on ``nprocs`` ranks; an argv starting with ``omni-ds`` runs this checkout's CLI."""
    argv = list(argv)
    if argv and argv[0] == "omni-ds":
        argv = [sys.executable, "-m", "omni_ds.cli", *argv[1:]]
    port = _free_port()
    envs = [rank_environ(r, nprocs, port, nodes, env) for r in range(nprocs)]
    return RankGroup([argv] * nprocs, envs, cwd=cwd)


def run_command(
    argv: Sequence[str], nprocs: int, *, timeout: float = 300.0, check: bool = True, **kw
):
    with start_command(argv, nprocs, **kw) as group:
        return group.wait(timeout=timeout, check=check)


def run_function(
    fn: Callable,
    nprocs: int,
    *,
    args: Sequence = (),
    kwargs: Mapping | None = None,
    timeout: float = 300.0,
    nodes: int = 1,
    env: Mapping[str, str] | None = None,
) -> list:
    """Call module-level ``fn(*args, **kwargs)`` on every rank; returns each rank's return value."""
    workdir = Path(tempfile.mkdtemp(prefix="omni-ds-fn-"))
    (workdir / "in.pkl").write_bytes(pickle.dumps((tuple(args), dict(kwargs or {}))))
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        fn.__module__, fn.__qualname__, str(workdir / "in.pkl"), str(workdir / "out-{rank}.pkl"),
    ]  # fmt: skip
    port = _free_port()
    envs = [rank_environ(r, nprocs, port, nodes, env) for r in range(nprocs)]
    with RankGroup([argv] * nprocs, envs) as group:
        group.wait(timeout=timeout)
    return [pickle.loads((workdir / f"out-{r}.pkl").read_bytes()) for r in range(nprocs)]


def _worker_main(module_name: str, qualname: str, in_path: str, out_pattern: str) -> None:
    fn = importlib.import_module(module_name)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    args, kwargs = pickle.loads(Path(in_path).read_bytes())
    result = fn(*args, **kwargs)
    Path(out_pattern.format(rank=os.environ["RANK"])).write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "--worker":
        sys.exit("usage: python tests/harness.py --worker MODULE QUALNAME IN OUT")
    _worker_main(*sys.argv[2:])
