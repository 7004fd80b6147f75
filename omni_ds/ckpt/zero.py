"""DeepSpeed's ZeRO-1/2 + MoE checkpoint layout: read it for any (world size, ep_size), plan another.

A tag directory written by ``save_checkpoint`` on W ranks with expert-parallel size K holds the
files :mod:`omni_ds.ckpt.format` lists, among them one ZeRO optimizer shard per rank. Each
optimizer param group is flattened in parameter order (plus per-parameter alignment padding
when ``zero_optimization.parameter_alignment`` is on), padded to a multiple of
``2 x group size`` and cut into equal partitions, one per rank of the group's data-parallel group:
all W ranks for dense groups; for expert groups (named ``ep_size_K``), the W/K ranks ``r`` with the
same expert-parallel rank ``r % K`` (their local expert ids map to global ones by
:func:`~omni_ds.ckpt.format.global_expert_name`); partition id ``r // K``. A shard stores, per
group, the unpadded fp32 partition (``single_partition_of_fp32_groups``), the torch optimizer's
state over the padded partition (``exp_avg``, ``exp_avg_sq`` and a scalar ``step``), the padding,
and ``param_slice_mappings`` (where each parameter's slice sits in the partition). DeepSpeed
splits expert groups into chunks of at most :data:`MOE_MAX_GROUP_SIZE` values, so the number of
groups can change with ``ep_size``.

:class:`ZeroCheckpoint` reads one parameter at a time (its fp32 master and optimizer state, slices
concatenated across ranks, as ``param_slice_mappings`` place them) from memory-mapped shards;
:func:`plan_groups` lays parameters out for another world size with the same rules, which
:meth:`ZeroCheckpoint.plan` first checks against the source's own layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from pathlib import Path

import torch

from omni_ds.ckpt.format import (
    EP_GROUP,
    EXPERT_FILE,
    MAIN_FILE,
    ZERO_FILE,
    expert_file,
    expert_name,
    global_expert_name,
    load_file,
    resolve_tag_dir,
    split_expert_name,
    verified_tag_dir,
    zero_file,
)
from omni_ds.errors import CheckpointError

# split_params_into_different_moe_groups_for_optimizer's default, which omni_ds.train.engine uses
MOE_MAX_GROUP_SIZE = 178956971
# DeepSpeed's nccl_start_alignment_factor: flat groups are padded to 2 x data-parallel size
START_ALIGNMENT = 2
# what reading a parameter takes from a shard (DeepSpeedZeroOptimizer's and BF16_Optimizer's)
READ_KEYS = {"base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings"}


@dataclasses.dataclass
class GroupPlan:
    """One optimizer param group's flat layout (local parameter names, in flat order)."""

    moe: bool
    names: list[str]
    numels: list[int]
    paddings: list[int]
    """Alignment padding after each parameter (``param_alignment_paddings``)."""
    dp_size: int
    """Ranks the group is partitioned over: W for dense groups, W / ep_size for experts."""

    @property
    def partition_size(self) -> int:
        numel = sum(self.numels) + sum(self.paddings)
        alignment = START_ALIGNMENT * self.dp_size
        return math.ceil(numel / alignment) * alignment // self.dp_size

    def padding(self, partition: int) -> int:
        """Values at the end of ``partition`` past the last parameter (``group_paddings``)."""
        used = sum(self.numels) + sum(self.paddings)
        start = partition * self.partition_size
        return self.partition_size - min(max(used - start, 0), self.partition_size)

    def fragments(self, partition: int) -> OrderedDict[str, tuple[int, int, int]]:
        """name -> (start in the partition, numel, offset in the parameter) for ``partition``."""
        lo = partition * self.partition_size
        hi = lo + self.partition_size
        out: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        offset = 0
        for name, numel, pad in zip(self.names, self.numels, self.paddings):
            start, end = max(offset, lo), min(offset + numel, hi)
            if start < end:
                out[name] = (start - lo, end - start, start - offset)
            offset += numel + pad
        return out


def param_alignment_paddings(numels: list[int], alignment: int) -> list[int]:
    """DeepSpeed's per-parameter padding: each parameter but the last ends on ``alignment``."""
    out, offset = [], 0
    for i, numel in enumerate(numels):
        offset += numel
        pad = 0 if i == len(numels) - 1 else (-offset) % alignment
        out.append(pad)
        offset += pad
    return out


def local_expert_order(names: list[str], experts_per_rank: int) -> list[str]:
    """The local expert parameters of one rank with ``experts_per_rank`` experts per MoE layer,
    in module order (layer by layer, expert by expert), from any rank's list of them."""
    prefixes: list[str] = []
    suffixes: dict[str, list[str]] = {}
    for name in names:
        prefix, local, suffix = split_expert_name(name)
        if prefix not in suffixes:
            prefixes.append(prefix)
            suffixes[prefix] = []
        if local == 0:
            suffixes[prefix].append(suffix)
    return [
        expert_name(p, i, s) for p in prefixes for i in range(experts_per_rank) for s in suffixes[p]
    ]


def plan_groups(
    dense: list[list[tuple[str, int]]],
    experts: list[tuple[str, int]],
    *,
    world_size: int,
    ep_size: int,
    alignment: int,
    max_group_size: int = MOE_MAX_GROUP_SIZE,
) -> list[GroupPlan]:
    """Groups for ``world_size`` ranks: each dense group as is, then the local experts (names and
    sizes in module order) in chunks of at most ``max_group_size`` values."""

    def group(params: list[tuple[str, int]], moe: bool) -> GroupPlan:
        numels = [n for _, n in params]
        return GroupPlan(moe=moe, names=[k for k, _ in params], numels=numels,
                         paddings=param_alignment_paddings(numels, alignment),
                         dp_size=world_size // ep_size if moe else world_size)  # fmt: skip

    chunks: list[list[tuple[str, int]]] = []
    size = 0
    for name, numel in experts:
        if not chunks or size + numel > max_group_size:
            chunks.append([])
            size = 0
        chunks[-1].append((name, numel))
        size += numel
    return [group(params, moe=False) for params in dense] + [group(c, moe=True) for c in chunks]


class ZeroCheckpoint:
    """A ZeRO-1/2 (+ MoE) checkpoint tag, opened lazily: shards are memory-mapped and each
    parameter's values are only read by :meth:`read`.

    Reading needs only the shards' own slice mappings, so it also serves layouts that
    :meth:`plan` refuses to reshard (e.g. ``round_robin_gradients``, or bf16 ZeRO-1 with fp32
    gradient accumulation, whose shards DeepSpeed's ``BF16_Optimizer`` writes)."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        # verify=False: the caller verified the tag already
        self.tag_dir = verified_tag_dir(path) if verify else resolve_tag_dir(path)
        self.main = load_file(self.tag_dir / MAIN_FILE)
        self.world_size = int(self.main["dp_world_size"])
        self.num_experts = list(self.main.get("num_experts") or [])
        # zero_prefix: "bf16_" when the shards' names start with it (bf16 training), else ""
        self.zero_prefix, self.zero_files = self._zero_files()
        self.expert_files = self._expert_files()
        self.shards = []
        for f in self.zero_files:
            osd = load_file(f).get("optimizer_state_dict")
            if not isinstance(osd, dict) or not READ_KEYS <= osd.keys():
                raise CheckpointError(
                    f"{f} is not a ZeRO stage 1/2 optimizer shard (ZeRO-3 is not supported)"
                )
            if not isinstance(osd["base_optimizer_state"], dict):
                raise CheckpointError(
                    f"{f}: elastic ZeRO checkpoints (zero_optimization.elastic_checkpoint) are "
                    "not supported; save with elastic_checkpoint off"
                )
            self.shards.append(osd)
        groups = self.shards[0]["base_optimizer_state"]["param_groups"]
        self.group_moe = [bool(g.get("moe")) for g in groups]
        moe_names = {g["name"] for g in groups if g.get("moe")}
        if len(moe_names) > 1:
            raise CheckpointError(f"{self.tag_dir}: expert groups of several ep sizes {moe_names}")
        self.ep_size = int(EP_GROUP.search(moe_names.pop()).group(1)) if moe_names else 1
        shapes = self.main["param_shapes"]
        if shapes is None or len(shapes) != len(groups):
            raise CheckpointError(f"{self.tag_dir / MAIN_FILE}: param_shapes do not match the "
                                  f"{len(groups)} optimizer groups of {self.zero_files[0]}")  # fmt: skip
        self.shapes: dict[str, torch.Size] = {}
        self.dense: list[list[tuple[str, int]]] = []
        self.local_experts: list[str] = []
        for moe, group in zip(self.group_moe, shapes):
            sizes = [(k, math.prod(s)) for k, s in group.items()]
            self.shapes.update({k: torch.Size(s) for k, s in group.items()})
            if moe:
                self.local_experts += [k for k, _ in sizes]
            else:
                self.dense.append(sizes)
        if len(set(self.num_experts)) > 1:
            # global ids below are computed with one count of experts per rank for all layers
            raise CheckpointError(f"{self.tag_dir}: MoE layers with different numbers of experts "
                                  f"{self.num_experts} are not supported")  # fmt: skip
        total_experts = max(self.num_experts, default=0)
        self.experts_per_rank = total_experts // self.ep_size if total_experts else 0
        self._index = self._build_index()
        self._alignment: int | None = None  # set once the layout rules are checked (plan)

    def _zero_files(self) -> tuple[str, list[Path]]:
        found = {int(m.group(1)): p for p in self.tag_dir.iterdir()
                 if (m := ZERO_FILE.fullmatch(p.name))}  # fmt: skip
        if not found:
            raise CheckpointError(
                f"{self.tag_dir} has no ZeRO optimizer shards (*zero_pp_rank_*_optim_states.pt)"
            )
        prefix = "bf16_" if found[min(found)].name.startswith("bf16_") else ""
        missing = [r for r in range(self.world_size) if r not in found]
        if missing:
            names = [zero_file(r, prefix) for r in missing]
            raise CheckpointError(
                f"{self.tag_dir}: missing ZeRO shard(s) {', '.join(names)} of the "
                f"{self.world_size} ranks that wrote it; the checkpoint is incomplete"
            )
        return prefix, [found[r] for r in range(self.world_size)]

    def _expert_files(self) -> list[Path]:
        files = []
        for layer, count in enumerate(self.num_experts):
            for e in range(count):
                f = self.tag_dir / expert_file(layer, e)
                if not f.is_file():
                    raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
                files.append(f)
        extra = [p.name for p in self.tag_dir.iterdir()
                 if EXPERT_FILE.fullmatch(p.name) and p not in files]  # fmt: skip
        if extra:
            raise CheckpointError(f"{self.tag_dir}: unexpected expert files {sorted(extra)}")
        return files

    def _build_index(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """Global name -> [(rank, group, start, numel)] in partition order."""
        index: dict[str, list[tuple[int, int, int, int, int]]] = {}
        for rank, shard in enumerate(self.shards):
            ep_rank = rank % self.ep_size
            for g, (moe, mapping) in enumerate(zip(self.group_moe, shard["param_slice_mappings"])):
                part = rank // self.ep_size if moe else rank
                for name, address in mapping.items():
                    if moe:
                        name = global_expert_name(name, ep_rank, self.experts_per_rank)
                    index.setdefault(name, []).append((part, rank, g, address.start, address.numel))
        return {k: [v[1:] for v in sorted(parts)] for k, parts in index.items()}

    def _check_layout_rules(self) -> int:
        """The parameter alignment, once the source layout is what :func:`plan_groups` gives for
        its own world size and ep_size (the rules hold for this DeepSpeed version and config)."""
        for f, shard in zip(self.zero_files, self.shards):
            if "zero_stage" not in shard:  # BF16_Optimizer's shards differ from ZeRO's
                raise CheckpointError(
                    f"{f} is not a ZeRO stage 1/2 optimizer shard (bf16 + ZeRO-1 with fp32 "
                    "gradient accumulation is not supported for resharding)"
                )
        ds_config = self.main.get("ds_config") or {}
        zero = ds_config.get("zero_optimization") or {}
        if zero.get("round_robin_gradients"):
            raise CheckpointError(
                f"{self.tag_dir}: zero_optimization.round_robin_gradients reorders parameters; "
                "resharding supports it off (the default)"
            )
        alignment = 1
        if zero.get("parameter_alignment"):
            dtypes = [t.dtype for t in self.main["module"].values() if t.is_floating_point()]
            size = torch.tensor([], dtype=dtypes[0] if dtypes else torch.float32).element_size()
            alignment = 16 // math.gcd(16, size)
        local = self.local_experts
        if local and local_expert_order(local, self.experts_per_rank) != local:
            raise CheckpointError(f"{self.tag_dir}: expert parameters are not in module order")
        plan = self._plan(self.world_size, self.ep_size, alignment)
        if len(plan) != len(self.group_moe):
            raise CheckpointError(f"{self.tag_dir}: {len(self.group_moe)} optimizer groups, "
                                  f"the layout rules give {len(plan)}")  # fmt: skip
        for rank, (shard, path) in enumerate(zip(self.shards, self.zero_files)):
            for g, (group, mapping) in enumerate(zip(plan, shard["param_slice_mappings"])):
                part = rank // self.ep_size if group.moe else rank
                expected = {k: (s, n) for k, (s, n, _) in group.fragments(part).items()}
                saved = {k: (a.start, a.numel) for k, a in mapping.items()}
                if saved != expected or shard["group_paddings"][g] != group.padding(part):
                    raise CheckpointError(
                        f"{path}: group {g}'s partition layout differs from DeepSpeed's rules "
                        "as omni-ds knows them (DeepSpeed version or config not supported)"
                    )
        return alignment

    def plan(self, world_size: int, ep_size: int) -> list[GroupPlan]:
        """Group layout for ``world_size`` ranks with ``ep_size`` (local expert names); raises
        :class:`CheckpointError` when the source layout itself does not follow the rules."""
        if self._alignment is None:
            self._alignment = self._check_layout_rules()
        return self._plan(world_size, ep_size, self._alignment)

    def _plan(self, world_size: int, ep_size: int, alignment: int) -> list[GroupPlan]:
        per_rank = self.experts_per_rank * self.ep_size // ep_size
        experts = [(k, self.shapes[self._local_of(k)].numel())
                   for k in local_expert_order(self.local_experts, per_rank)]  # fmt: skip
        return plan_groups(self.dense, experts, world_size=world_size, ep_size=ep_size,
                           alignment=alignment)  # fmt: skip

    def _local_of(self, name: str) -> str:
        """The source rank-0 local name with the same shape as ``name`` (experts are alike)."""
        if name in self.shapes:
            return name
        prefix, _, suffix = split_expert_name(name)
        return expert_name(prefix, 0, suffix)

    def names(self) -> list[str]:
        """Every trainable parameter's global name: dense groups, then experts."""
        return list(self._index)

    def shape(self, name: str) -> torch.Size:
        return self.shapes[self._local_of(name)]

    def read(self, name: str, *, masters_only: bool = False) -> dict[str, torch.Tensor]:
        """``{"fp32": master, <state key>: value, ...}`` of one parameter (global name), shaped
        like it; optimizer state keys are those stored per value (``exp_avg``, ``exp_avg_sq``).
        ``masters_only`` reads the fp32 master alone (what consolidation needs)."""
        out: dict[str, list[torch.Tensor]] = {}
        for rank, g, start, numel in self._index[name]:
            shard = self.shards[rank]
            out.setdefault("fp32", []).append(
                shard["single_partition_of_fp32_groups"][g].narrow(0, start, numel)
            )
            if masters_only:
                continue
            for key, value in shard["base_optimizer_state"]["state"][g].items():
                if torch.is_tensor(value) and value.dim() == 1:
                    out.setdefault(key, []).append(value.narrow(0, start, numel))
        shape = self.shape(name)
        if sum(t.numel() for t in out["fp32"]) != shape.numel():
            raise CheckpointError(f"{self.tag_dir}: {name!r} is incomplete in the ZeRO shards")
        return {k: torch.cat(v).float().view(shape) for k, v in out.items()}

    def value_keys(self, g: int) -> list[str]:
        """Optimizer state keys of group ``g`` stored per value (``exp_avg``, ``exp_avg_sq``)."""
        state = self.shards[0]["base_optimizer_state"]["state"].get(g, {})
        return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1]

    def group_scalars(self, g: int) -> dict:
        """Non-per-value optimizer state of group ``g`` (e.g. Adam's ``step``) on rank 0."""
        state = self.shards[0]["base_optimizer_state"]["state"].get(g, {})
        return {k: v for k, v in state.items() if not (torch.is_tensor(v) and v.dim() == 1)}
