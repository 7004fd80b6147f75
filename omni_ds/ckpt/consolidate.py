"""One full-precision state dict from a sharded DeepSpeed MoE checkpoint, with no processes.

DeepSpeed's ``zero_to_fp32`` crashes on native-MoE checkpoints (its ``*_model_states.pt`` glob
picks up the expert files), and universal checkpoints mis-load experts when ``ep_size > 1``
(``shared/notes/deepspeed-cpu.md`` §5). A ZeRO-1/2 + expert-parallel checkpoint tag holds:

    mp_rank_00_model_states.pt                 ['module']: dense weights (router included, plus
                                               one alias key per MoE layer sharing it)
    layer_<l>_expert_<e>_mp_rank_00_model_states.pt   one per MoE layer x GLOBAL expert id
    [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's ZeRO shard: fp32 master slices

:func:`consolidate` merges the main ``module`` with every expert file (their keys already use
global expert ids), which is exact for fp32 training. When the module copy is lower precision
(bf16/fp16 training) the fp32 masters are rebuilt from the ZeRO shards instead: each shard's
``param_slice_mappings`` says where every parameter's slice lies in that rank's flat fp32
partition; a parameter's slices follow each other in rank order within its data-parallel group
(all ranks for dense parameters; for experts, the ranks with the same expert-parallel rank
``r % ep_size``, whose local expert ``i`` is global expert ``(r % ep_size) * E_local + i``).

The result loads with ``load_state_dict`` into the same model built with ``ep_size=1``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import torch

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


def resolve_tag_dir(path: str | Path) -> Path:
    """The checkpoint tag directory for a run dir, a ``checkpoints/`` dir or a tag dir."""
    path = Path(path)
    if (path / MAIN_FILE).is_file():
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        latest = ckpt_dir / "latest"
        if latest.is_file():
            tag_dir = ckpt_dir / latest.read_text().strip()
            if not (tag_dir / MAIN_FILE).is_file():
                raise CheckpointError(f"{latest} names {tag_dir}, which has no {MAIN_FILE}")
            return tag_dir
    raise CheckpointError(
        f"{path} is neither a checkpoint tag (no {MAIN_FILE}) nor a run or checkpoints dir with "
        "a 'latest' file; pass RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_<N>"
    )


def load_file(path: Path) -> dict:
    """One checkpoint file, memory-mapped (tensors are read when used); a missing or damaged file
    raises :class:`CheckpointError` naming it."""
    try:
        # DeepSpeed pickles its own classes (fragment_address, LossScaler): weights_only cannot
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:
        raise CheckpointError(
            f"{path} is damaged and cannot be read ({type(e).__name__}: {e})"
        ) from e


def _to_global(name: str, ep_rank: int, local_counts: dict[str, int]) -> str:
    m = EXPERT_KEY.match(name)
    if m is None:
        raise CheckpointError(f"expert parameter {name!r} has no deepspeed_experts.<i> in its name")
    prefix, local, rest = m.groups()
    return f"{prefix}{ep_rank * local_counts[prefix] + int(local)}{rest}"


def _local_expert_counts(param_shapes: list[dict]) -> dict[str, int]:
    """Experts per rank for each MoE module prefix, from rank 0's parameter list."""
    ids: dict[str, set[str]] = defaultdict(set)
    for group in param_shapes:
        for name in group:
            m = EXPERT_KEY.match(name)
            if m:
                ids[m.group(1)].add(m.group(2))
    return {prefix: len(v) for prefix, v in ids.items()}


def zero_fp32_masters(tag_dir: Path, param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """Flat fp32 master of every trainable parameter (global expert names) from the ZeRO shards."""
    files = {int(m.group(1)): p for p in tag_dir.iterdir() if (m := ZERO_FILE.fullmatch(p.name))}
    if not files:
        raise CheckpointError(
            f"{tag_dir} has no ZeRO optimizer shards (*zero_pp_rank_*_optim_states.pt)"
        )
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{tag_dir}: ZeRO shards of ranks {sorted(files)}; some are missing")
    local_counts = _local_expert_counts(param_shapes)
    slices: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for rank, path in sorted(files.items()):
        osd = load_file(path)["optimizer_state_dict"]
        groups = osd["base_optimizer_state"]["param_groups"]
        for group, partition, mapping in zip(
            groups, osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]
        ):
            ep_size = int(EP_GROUP.search(group["name"]).group(1)) if group.get("moe") else 1
            ep_rank, group_rank = rank % ep_size, rank // ep_size
            for name, address in mapping.items():
                if group.get("moe"):
                    name = _to_global(name, ep_rank, local_counts)
                piece = partition.narrow(0, address.start, address.numel)
                slices[name].append((group_rank, piece.float()))
    return {
        name: torch.cat([p for _, p in sorted(parts, key=lambda x: x[0])])
        for name, parts in slices.items()
    }


def consolidate(path: str | Path) -> Consolidated:
    """Merge the checkpoint at ``path`` (see :func:`resolve_tag_dir`) into one fp32 state dict."""
    tag_dir = resolve_tag_dir(path)
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
        masters = zero_fp32_masters(tag_dir, main["param_shapes"])
        for name, flat in masters.items():
            if name not in state:
                raise CheckpointError(f"{tag_dir}: ZeRO shards hold {name!r}, the module does not")
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
