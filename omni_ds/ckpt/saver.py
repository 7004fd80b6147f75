"""Sharded checkpoints through DeepSpeed, made atomic, resumable exactly, and pruned.

Layout of ``RUN/checkpoints/``::

    step_<N>/                      DeepSpeed's save_checkpoint files (model + client state,
                                   layer_*_expert_* files, one ZeRO optimizer shard per rank)
    step_<N>/omni_ds_manifest.json written by rank 0 after every rank finished: step, world size,
                                   ep_size, every file with its size
    latest                         the tag of the newest complete checkpoint, replaced atomically

DeepSpeed's own ``latest`` is written by rank 0 *before* the final barrier, so it can name a tag
whose other shards are still being written; here it is written only after a barrier and the
manifest, via rename. A crash mid-save leaves a tag without a manifest, which loading never picks
and the next save of that tag clears.

DeepSpeed saves no RNG state; every rank's python/numpy/torch(/cuda) RNG and its data-loader
state are all-gathered into the client state (only rank 0 writes it) and each rank restores its
own entry. A checkpoint written with another world size or ep_size is first resharded for this
run into ``step_<N>.reshard-w<W>-ep<K>/`` next to it (:func:`omni_ds.reshard.reshard_for_resume`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_ds import dist
from omni_ds.config.train import CheckpointConfig
from omni_ds.errors import CheckpointError

MANIFEST = "omni_ds_manifest.json"
LATEST = "latest"
CLIENT_KEY = "omni_ds"
_TAG = re.compile(r"step_(\d+)")


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


def tag_of(step: int) -> str:
    return f"step_{step}"


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete checkpoint directory, or None when incomplete or damaged."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return manifest


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _TAG.fullmatch(p.name)) and p.is_dir() and read_manifest(p) is not None
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    """What ``latest`` names if complete, else the newest complete checkpoint, else None."""
    latest = directory / LATEST
    if latest.is_file():
        path = directory / latest.read_text().strip()
        if read_manifest(path) is not None:
            return path
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            files = {
                str(f.relative_to(path)): f.stat().st_size
                for f in sorted(path.rglob("*"))
                if f.is_file()
            }
            manifest = {
                "step": step,
                "world_size": self.world_size,
                "ep_size": self.ep_size,
                "files": files,
                "time": time.time(),
            }
            _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
            _write_atomic(self.dir / LATEST, tag)
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
        newest = int(_TAG.fullmatch(keep.name).group(1))
        for p in self.dir.iterdir():
            m = _TAG.fullmatch(p.name)
            if m and int(m.group(1)) < newest and read_manifest(p) is None:
                shutil.rmtree(p, ignore_errors=True)

    def resume_path(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` (auto | none | a directory) selects, or None to start fresh."""
        if resume == "none":
            if latest_checkpoint(self.dir) is not None:
                raise CheckpointError(
                    f"{self.dir} already holds checkpoints and checkpoint.resume is 'none'; use "
                    "--resume auto to continue, or pick a new train.run_dir"
                )
            return None
        if resume == "auto":
            return latest_checkpoint(self.dir)
        path = Path(resume)
        if read_manifest(path) is None:
            raise CheckpointError(
                f"checkpoint.resume: {resume!r} is not a complete omni-ds checkpoint (no valid "
                f"{MANIFEST}); name a RUN/checkpoints/step_N directory"
            )
        return path

    def load(self, path: Path) -> tuple[dict, Any]:
        """Load ``path`` into the engine; returns (the client dict, this rank's data state).

        RNG states are not touched here: call :meth:`restore_rng` last, after everything that
        draws random numbers while starting up (e.g. a DataLoader iterator draws its base seed)."""
        manifest = read_manifest(path)
        if manifest is None:
            raise CheckpointError(f"{path} is incomplete or damaged; it cannot be loaded")
        if (manifest["world_size"], manifest["ep_size"]) != (self.world_size, self.ep_size):
            # Another layout: rewrite it for this one first (a sibling directory; omni_ds.reshard).
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
