"""Bring up torch.distributed and DeepSpeed from whatever launched us.

Every entry point calls :func:`init_distributed` once. It reads the launch environment,

| launcher                     | what it sets                                   | what we add                        |
| ---------------------------- | ---------------------------------------------- | ---------------------------------- |
| ``deepspeed`` / ``torchrun`` | RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT | nothing                            |
| ``srun`` (SLURM job step)    | SLURM_PROCID, SLURM_STEP_NUM_TASKS, ...        | RANK/..., MASTER_* from the job    |
| plain ``python``             | nothing                                        | rank 0 of 1 on 127.0.0.1, free port |

then picks CUDA + NCCL when a GPU is visible and DeepSpeed's CPU accelerator + gloo otherwise, and
handles the CPU traps measured with DeepSpeed 0.19.8 so that no user has to:
the shared-memory comm op that DeepSpeed JIT-compiles at init (~35 s, unused by training) is not
built; ranks sharing a host split its cores instead of oversubscribing them; and
:func:`shutdown` ends every successful run with ``barrier()`` + ``destroy_process_group()``, without
which ~4% of gloo runs abort at interpreter exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping

import numpy as np
import torch

import omni_ds  # noqa: F401  (selects DS_ACCELERATOR before deepspeed is imported)


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """``env`` (torchrun, deepspeed or hand-set variables), ``slurm`` or ``single``."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """The brought-up process group: what every other module asks about its rank and device."""

    env: LaunchEnv
    device: torch.device
    backend: str
    """``nccl`` on GPUs, ``gloo`` on the CPU."""
    accelerator: str
    """DeepSpeed's accelerator name: ``cuda`` or ``cpu``."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``n[1-2],gpu07`` -> ``n1``), as ``scontrol`` expands it."""
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    # Without scontrol: expand the first entry's bracket range by hand.
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    start = m.group(2).split(",")[0].split("-")[0]
    return f"{m.group(1)}{start}{m.group(3)}"


def _slurm_tasks_per_node(environ: Mapping[str, str], world_size: int) -> int:
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x3)" or "2,1"; the first figure is ours for
    # homogeneous allocations, which is what one process per GPU gives.
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key)
        if value:
            return int(re.match(r"\d+", value).group(0))
    return world_size


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and rendezvous address from the environment (no side effects)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        return LaunchEnv(
            rank=int(environ["RANK"]),
            world_size=world,
            local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="env",
        )
    # Only a job *step* started by srun has SLURM_STEP_NUM_TASKS; the batch script itself has
    # SLURM_NTASKS for the whole allocation but is a single process.
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        world = int(environ["SLURM_STEP_NUM_TASKS"])
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        return LaunchEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            local_world_size=_slurm_tasks_per_node(environ, world),
            master_addr=environ.get("MASTER_ADDR") or slurm_first_host(nodelist),
            master_port=int(environ.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return LaunchEnv(
        0, 1, 0, 1, "127.0.0.1", int(environ.get("MASTER_PORT") or free_port()), "single"
    )


def _skip_shm_comm_build() -> None:
    # DeepSpeed's CPU TorchBackend JIT-compiles a shared-memory op (needs g++, ~35 s) on every
    # fresh environment; only inference_all_reduce uses it. The module must be taken from
    # sys.modules: `import deepspeed.comm.torch as m` binds the real torch package instead.
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def _share_cpu_cores(env: LaunchEnv) -> None:
    # Ranks on one host each default to all cores: 4-10x slower steps on CPU. A user's
    # OMP_NUM_THREADS is respected.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch. ``rank`` offsets the seed so ranks draw different noise."""
    value = seed + 1_000_003 * rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Create the default process group (idempotent) and return this process's place in it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = detect_launch_env()
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    accelerator = get_accelerator()
    name = accelerator.device_name()
    if name == "cpu":
        _skip_shm_comm_build()
        _share_cpu_cores(env)
        device = torch.device("cpu")
    else:
        accelerator.set_device(env.local_rank)
        device = torch.device(name, env.local_rank)
    backend = accelerator.communication_backend_name()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(env=env, device=device, backend=backend, accelerator=name)


def shutdown() -> None:
    """End a *successful* run cleanly. After an exception, just exit: destroying can deadlock."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(timeout_s: float = 600.0) -> Iterator[DistInfo]:
    """``with distributed() as info:`` brings the group up and shuts it down on success only."""
    info = init_distributed(timeout_s)
    yield info
    shutdown()
