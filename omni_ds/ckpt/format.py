"""The checkpoint format on disk, in one place: file and tag names, reading a file, the manifest
and ``latest``, and DeepSpeed's local -> global expert ids.

``RUN/checkpoints/`` holds::

    step_<N>/                       one checkpoint tag, written by DeepSpeed's save_checkpoint:
      mp_rank_00_model_states.pt      ['module']: dense weights (router included, plus one alias
                                      key per MoE layer sharing it), param_shapes, dp_world_size,
                                      num_experts, and the client state (omni-ds's under 'omni_ds')
      layer_<l>_expert_<e>_mp_rank_00_model_states.pt   one per MoE layer x GLOBAL expert id
      [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's ZeRO-1/2 optimizer shard
      omni_ds_manifest.json           omni-ds's completeness marker, written last: step, world
                                      size, ep_size, every other file of the tag with its size
                                      and checksum (:mod:`omni_ds.ckpt.integrity`)
    step_<N>.reshard-w<W>-ep<K>/    step_<N> rewritten for W ranks and ep_size K (on resume)
    latest                          the tag of the newest complete checkpoint

A tag counts as complete only when its manifest is there and every file it lists has its size;
it *verifies* when every file also has its checksum (:func:`verify`, run before anything loads
it). Files are read with :func:`omni_ds.ckpt.safe_load.safe_load` (no pickled code).
Expert-parallel rank ``r % K`` of a run with ep_size K holds E / K experts of each MoE layer;
its local expert ``i`` is global expert ``(r % K) * E / K + i`` (:func:`global_expert_name`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from omni_ds.ckpt import integrity
from omni_ds.ckpt.safe_load import safe_load
from omni_ds.errors import CheckpointError

MAIN_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")
EP_GROUP = re.compile(r"ep_size_(\d+)")
# keys DeepSpeed itself puts in the main file; everything else there is the client_state
ENGINE_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version", "num_experts", "ds_autoep_layers", "checkpoint_parallel_dimensions",
}  # fmt: skip
MANIFEST = "omni_ds_manifest.json"
LATEST = "latest"
CLIENT_KEY = "omni_ds"
TAG = re.compile(r"step_(\d+)")
RESHARDED = "*.reshard-w*-ep*"
"""Glob of :func:`resharded_dir` names."""


def tag_of(step: int) -> str:
    return f"step_{step}"


def step_of(tag: str) -> int | None:
    """The step of a tag name ``step_<N>``; None for any other name."""
    m = TAG.fullmatch(tag)
    return int(m.group(1)) if m else None


def resharded_dir(tag_dir: Path, world_size: int, ep_size: int) -> Path:
    """Where ``tag_dir`` resharded for ``world_size`` ranks and ``ep_size`` goes, beside it."""
    return tag_dir.parent / f"{tag_dir.name}.reshard-w{world_size}-ep{ep_size}"


def expert_file(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def zero_file(rank: int, prefix: str = "") -> str:
    """Rank ``rank``'s ZeRO shard name; ``prefix`` is ``bf16_`` when the run trained in bf16."""
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def split_expert_name(name: str) -> tuple[str, int, str]:
    """``(prefix, expert id, suffix)`` of an expert parameter name."""
    m = EXPERT_KEY.match(name)
    if m is None:
        raise CheckpointError(f"expert parameter {name!r} has no deepspeed_experts.<i> in its name")
    return m.group(1), int(m.group(2)), m.group(3)


def expert_name(prefix: str, expert: int, suffix: str) -> str:
    return f"{prefix}{expert}{suffix}"


def global_expert_name(local: str, ep_rank: int, per_rank: int) -> str:
    """The global name of expert parameter ``local`` of expert-parallel rank ``ep_rank``, which
    holds ``per_rank`` experts of each MoE layer."""
    prefix, i, suffix = split_expert_name(local)
    return expert_name(prefix, ep_rank * per_rank + i, suffix)


def load_file(path: Path) -> dict:
    """One checkpoint file, memory-mapped (tensors are read when used); a missing, damaged or
    unsafe file raises :class:`CheckpointError` naming it."""
    return safe_load(path, mmap=True)


def resolve_tag_dir(path: str | Path) -> Path:
    """The checkpoint tag directory for a run dir, a ``checkpoints/`` dir or a tag dir."""
    path = Path(path)
    if (path / MAIN_FILE).is_file():
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        latest = ckpt_dir / LATEST
        if latest.is_file():
            tag_dir = ckpt_dir / latest.read_text().strip()
            if not (tag_dir / MAIN_FILE).is_file():
                raise CheckpointError(f"{latest} names {tag_dir}, which has no {MAIN_FILE}")
            return tag_dir
    raise CheckpointError(
        f"{path} is neither a checkpoint tag (no {MAIN_FILE}) nor a run or checkpoints dir with "
        "a 'latest' file; pass RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_<N>"
    )


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a power loss only once its directory is synced
        os.fsync(directory)
    finally:
        os.close(directory)


def write_manifest(tag_dir: Path, *, step: int, world_size: int, ep_size: int,
                   digests: dict[str, tuple[int, str]] | None = None, **extra) -> None:  # fmt: skip
    """Mark ``tag_dir`` complete, once every file of it is on disk: list them with their sizes
    and checksums. ``digests`` (name -> (size, digest)) are those the writers took; any other
    file, or one whose size changed since, is read (and fsynced) here."""
    digests = digests or {}
    files = {}
    for f in sorted(tag_dir.rglob("*")):
        if not f.is_file() or f.name == MANIFEST:
            continue
        name = str(f.relative_to(tag_dir))
        size, digest = digests.get(name, (None, None))
        if size != f.stat().st_size:
            size, digest = integrity.file_digest(f, fsync=True)
        files[name] = {"size": size, integrity.HASH: digest}
    manifest = {"step": step, "world_size": world_size, "ep_size": ep_size, "files": files,
                "time": time.time(), **extra}  # fmt: skip
    manifest[integrity.SELF] = integrity.manifest_digest(manifest)
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def _entry_size(entry) -> int:
    return entry if isinstance(entry, int) else entry["size"]  # an int: before checksums


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete checkpoint directory (every file there with its size), or None
    when incomplete or damaged. Checksums are :func:`verify`'s."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != _entry_size(entry):
            return None
    return manifest


def verify(tag_dir: Path, names: list[str] | None = None) -> list[str]:
    """What keeps checkpoint ``tag_dir`` from verifying, one line each (empty: it verifies):
    no readable manifest, or files (only ``names`` of them if given) missing, resized or
    changed."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{tag_dir / MANIFEST} is missing or unreadable ({type(e).__name__}); the save "
                "did not finish, or the file was damaged"]  # fmt: skip
    recorded = manifest.get(integrity.SELF)  # absent in manifests written before checksums
    if recorded is not None and recorded != integrity.manifest_digest(manifest):
        return [f"{tag_dir / MANIFEST} does not match its own checksum (changed after the save)"]
    if names is None:
        names = sorted(files)
    return integrity.problems(tag_dir, files, names)


def manifest_files(tag_dir: Path) -> list[str]:
    """The names a checkpoint's manifest lists (empty when it has none)."""
    try:
        return sorted(json.loads((tag_dir / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return []


def verified_tag_dir(path: str | Path) -> Path:
    """:func:`resolve_tag_dir`, checked by :func:`verify` when the tag has an omni-ds manifest
    (a DeepSpeed checkpoint written without omni-ds has nothing to check against)."""
    tag_dir = resolve_tag_dir(path)
    if (tag_dir / MANIFEST).exists():
        found = verify(tag_dir)
        if found:
            raise CheckpointError(f"{tag_dir} does not verify: " + "; ".join(found))
    return tag_dir


def write_latest(directory: Path, tag: str) -> None:
    write_atomic(directory / LATEST, tag)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (step, p)
        for p in directory.iterdir()
        if (step := step_of(p.name)) is not None and p.is_dir() and read_manifest(p) is not None
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
