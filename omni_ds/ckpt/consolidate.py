"""One full-precision state dict from a sharded DeepSpeed MoE checkpoint, with no processes.

DeepSpeed 0.19.8's ``zero_to_fp32`` crashes on native-MoE checkpoints (its ``*_model_states.pt``
glob picks up the expert files as if they were model-parallel ranks), and its universal
checkpoints load the wrong experts when ``ep_size > 1``.

:func:`consolidate` merges the main file's ``module`` with every expert file (their keys already
use global expert ids; the files: :mod:`omni_ds.ckpt.format`), which is exact for fp32 training.
When the module copy is lower precision (bf16/fp16 training) each parameter's fp32 master is
taken from the ZeRO shards instead (:class:`~omni_ds.ckpt.zero.ZeroCheckpoint`); without shards
(ZeRO stage 0 keeps its optimizer in the main file) the module is upcast.

The result loads with ``load_state_dict`` into the same model built with ``ep_size=1``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from omni_ds.ckpt.format import (
    ENGINE_KEYS,
    EXPERT_FILE,
    MAIN_FILE,
    ZERO_FILE,
    load_file,
    verified_tag_dir,
)
from omni_ds.ckpt.zero import ZeroCheckpoint
from omni_ds.errors import CheckpointError


@dataclasses.dataclass(kw_only=True)
class Consolidated:
    """A checkpoint merged into one fp32 state dict (global expert ids, ``ep_size=1`` names)."""

    tag_dir: Path
    state_dict: dict[str, torch.Tensor]
    """Every key of the model's ``state_dict()``, shared parameters included under each alias."""
    shared: dict[str, str]
    """Alias key -> canonical key for tied parameters (the Omni router's per-layer aliases)."""
    fp32_masters: bool
    """True when the weights are DeepSpeed's fp32 values (fp32 module or ZeRO masters); False
    when a low-precision module had no ZeRO shards to take masters from (ZeRO stage 0) and was
    upcast."""
    global_steps: int
    client_state: dict

    def unique_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with each tied tensor once, under its canonical name."""
        return {k: v for k, v in self.state_dict.items() if k not in self.shared}


def consolidate(path: str | Path) -> Consolidated:
    """Merge the checkpoint at ``path`` (see :func:`~omni_ds.ckpt.format.resolve_tag_dir`) into
    one fp32 state dict; a tag whose files do not match their checksums is refused."""
    tag_dir = verified_tag_dir(path)
    main = load_file(tag_dir / MAIN_FILE)
    state = dict(main["module"])
    expert_files = [p for p in sorted(tag_dir.iterdir()) if EXPERT_FILE.fullmatch(p.name)]
    expected = sum(main.get("num_experts") or [])
    if len(expert_files) != expected:
        raise CheckpointError(
            f"{tag_dir}: {len(expert_files)} expert files but the checkpoint has {expected} "
            "experts over its MoE layers; the checkpoint is incomplete (was the save interrupted?)"
        )
    for p in expert_files:
        state.update(load_file(p))
    shared = dict(main.get("shared_params") or {})
    low_precision = any(
        v.is_floating_point() and v.dtype != torch.float32 for v in main["module"].values()
    )
    has_shards = any(ZERO_FILE.fullmatch(p.name) for p in tag_dir.iterdir())
    if low_precision and has_shards:
        shards = ZeroCheckpoint(tag_dir, verify=False)
        for name in shards.names():
            if name not in state:
                raise CheckpointError(f"{tag_dir}: ZeRO shards hold {name!r}, the module does not")
            flat = shards.read(name, masters_only=True)["fp32"]
            if flat.numel() != state[name].numel():
                raise CheckpointError(
                    f"{tag_dir}: {name!r} has {flat.numel()} fp32 values in the ZeRO shards but "
                    f"shape {tuple(state[name].shape)} in the module"
                )
            state[name] = flat.view(state[name].shape)
    # every key as an fp32 tensor; aliases point at their canonical tensor again
    state = {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}
    for alias, canonical in shared.items():
        state[alias] = state[canonical]
    return Consolidated(
        tag_dir=tag_dir,
        state_dict=state,
        shared=shared,
        fp32_masters=not low_precision or has_shards,
        global_steps=int(main.get("global_steps") or 0),
        client_state={k: v for k, v in main.items() if k not in ENGINE_KEYS},
    )
