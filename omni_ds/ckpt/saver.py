"""Sharded checkpoints through DeepSpeed, made atomic, resumable exactly, and pruned.

``Checkpointer.save`` writes tag ``step_<N>`` with DeepSpeed's ``save_checkpoint`` (each rank
digests and fsyncs what it wrote: :mod:`omni_ds.ckpt.engine_io`), then (rank 0, after a barrier:
every rank's shards are on disk) the manifest with every file's size and checksum, and
``latest``, each replaced atomically (the layout: :mod:`omni_ds.ckpt.format`). DeepSpeed's own ``latest`` is written by
rank 0 *before* the final barrier, so it can name a tag whose other shards are still being
written; it is not written here. A crash mid-save leaves a tag without a manifest, which loading
never picks and the next save of that tag clears.

DeepSpeed saves no RNG state; every rank's python/numpy/torch(/cuda) RNG and its data-loader
state are all-gathered into the client state (only rank 0 writes it) and each rank restores its
own entry. A checkpoint written with another world size or ep_size is first resharded for this
run into ``step_<N>.reshard-w<W>-ep<K>/`` next to it
(:func:`omni_ds.ckpt.reshard.reshard_for_resume`).

Which checkpoint a resume loads, verified, is :mod:`omni_ds.ckpt.select`'s decision.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_ds import dist
from omni_ds.ckpt.engine_io import install
from omni_ds.ckpt.format import (
    CLIENT_KEY,
    complete_checkpoints,
    read_manifest,
    step_of,
    tag_of,
    write_latest,
    write_manifest,
)
from omni_ds.ckpt.select import select_resume
from omni_ds.config.train import CheckpointConfig
from omni_ds.errors import CheckpointError


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save/resume one run's checkpoints with a DeepSpeed engine; every rank calls every method."""

    def __init__(self, engine, run_dir: Path, cfg: CheckpointConfig, *, ep_size: int):
        self.engine = engine
        self.cfg = cfg
        self.dir = Path(run_dir) / "checkpoints"
        self.ep_size = ep_size
        self.rank = dist.rank()
        self.world_size = dist.world_size()
        self._last_save = time.monotonic()
        self._io = install(engine) if engine is not None else None
        self.passed_over: list[str] = []
        """Newer checkpoints :meth:`resume_path` passed over because they did not verify."""

    def due(self, step: int) -> bool:
        """Whether the policy asks for a save after ``step``; all ranks get rank 0's answer."""
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        by_time = (
            self.cfg.every_minutes > 0
            and time.monotonic() - self._last_save >= 60 * self.cfg.every_minutes
        )
        if self.cfg.every_minutes > 0:
            # Clocks differ across ranks; a save is collective, so rank 0 decides for all.
            by_time = dist.broadcast_object(by_time)
        return by_steps or by_time

    def save(self, step: int, client: dict, data_state: Any) -> Path:
        """Write checkpoint ``step_<step>``: engine state, ``client`` (same on every rank), and
        each rank's RNG and ``data_state``."""
        tag = tag_of(step)
        path = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a crashed earlier attempt at this tag, or a finished one
                shutil.rmtree(path)
        dist.barrier()
        state = {
            CLIENT_KEY: {
                **client,
                "step": step,
                "world_size": self.world_size,
                "ep_size": self.ep_size,
                "rng": dist.gather_objects(rng_state()),
                "data": dist.gather_objects(data_state),
            }
        }
        self._io.take_written()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
        written = {str(Path(f).relative_to(path)): d for f, d in self._io.take_written().items()
                   if Path(f).parent == path}  # fmt: skip
        digests = {k: v for part in dist.gather_objects(written) for k, v in part.items()}
        if self.rank == 0:  # every rank's shards are on disk (the gather is a barrier)
            write_manifest(path, step=step, world_size=self.world_size, ep_size=self.ep_size,
                           digests=digests)  # fmt: skip
            write_latest(self.dir, tag)
            self._prune(keep=path)
        dist.barrier()
        self._last_save = time.monotonic()
        return path

    def _prune(self, keep: Path) -> None:
        complete = complete_checkpoints(self.dir)
        for old in complete[: -self.cfg.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        # Incomplete tags older than the newest complete one are debris of crashed saves.
        newest = step_of(keep.name)
        for p in self.dir.iterdir():
            step = step_of(p.name)
            if step is not None and step < newest and read_manifest(p) is None:
                shutil.rmtree(p, ignore_errors=True)

    def resume_path(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` (auto | none | a directory) selects, or None to start fresh
        (collective; :func:`omni_ds.ckpt.select.select_resume`)."""
        chosen = select_resume(self.dir, resume)
        self.passed_over = chosen.passed_over
        return chosen.path

    def load(self, path: Path) -> tuple[dict, Any]:
        """Load ``path`` into the engine; returns (the client dict, this rank's data state).

        RNG states are not touched here: call :meth:`restore_rng` last, after everything that
        draws random numbers while starting up (e.g. a DataLoader iterator draws its base seed)."""
        manifest = read_manifest(path)  # verified by omni_ds.ckpt.select
        if manifest is None:
            raise CheckpointError(f"{path} is incomplete or damaged; it cannot be loaded")
        if (manifest["world_size"], manifest["ep_size"]) != (self.world_size, self.ep_size):
            # Another layout: rewrite it for this one first, into a sibling directory.
            from omni_ds.ckpt.reshard import reshard_for_resume

            path = reshard_for_resume(path, self.world_size, self.ep_size)
        loaded, client = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        state = client[CLIENT_KEY]
        return state, state["data"][self.rank]

    def restore_rng(self, state: dict) -> None:
        """Put this rank's python/numpy/torch RNGs back where the checkpoint left them."""
        set_rng_state(state["rng"][self.rank])
