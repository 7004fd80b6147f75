"""Rewrite a ZeRO-1/2 + MoE checkpoint for another world size and expert-parallel size.

    reshard("runs/a/checkpoints/step_400", "runs/b/checkpoints/step_400", world_size=2, ep_size=1)

DeepSpeed 0.19.8 cannot resume MoE checkpoints on another layout: with a different data-parallel
size loading the optimizer state raises, with a different ``ep_size`` loading fails its alignment
check, and its universal checkpoints load the wrong experts when ``ep_size > 1``. Here every
parameter's fp32 master and Adam moments are read from the source shards
(:class:`~omni_ds.ckpt.zero.ZeroCheckpoint`) and written into the new ranks' flat partitions
with DeepSpeed's own layout rules, so ``engine.load_checkpoint`` on the new layout restores
weights, optimizer state, scheduler and step exactly. Expert files are keyed by global expert id
and are copied as they are; the main file gets the new ``dp_world_size`` and ``param_shapes``;
omni-ds's per-rank client state (RNG, loader and counters) is re-dealt to the new ranks
(:mod:`omni_ds.ckpt.rank_state`).

Memory: one parameter at a time is read from memory-mapped shards, and each new rank's partitions
are assembled in file-backed scratch buffers, so no process holds the optimizer state in RAM.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from omni_ds import dist
from omni_ds.ckpt.format import (
    CLIENT_KEY,
    MAIN_FILE,
    RESHARDED,
    global_expert_name,
    load_file,
    read_manifest,
    resharded_dir,
    write_manifest,
    zero_file,
)
from omni_ds.ckpt.rank_state import reshard_rank_states
from omni_ds.ckpt.zero import GroupPlan, ZeroCheckpoint
from omni_ds.errors import CheckpointError


def check_layout(src: ZeroCheckpoint, world_size: int, ep_size: int) -> None:
    experts = max(src.num_experts, default=0)
    if world_size < 1 or ep_size < 1 or world_size % ep_size:
        raise CheckpointError(f"ep_size {ep_size} must divide the world size {world_size}")
    if experts and experts % ep_size:
        raise CheckpointError(f"ep_size {ep_size} must divide the number of experts ({experts})")
    if not experts and ep_size != 1:
        raise CheckpointError(f"{src.tag_dir} has no experts; use ep_size 1")


def _scratch(directory: Path, numel: int) -> torch.Tensor:
    """A zero float32 tensor whose pages live in an (already unlinked) file, not in RAM."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".reshard-")
    try:
        os.ftruncate(fd, max(numel, 1) * 4)
        return torch.from_file(name, shared=True, size=max(numel, 1), dtype=torch.float32)[:numel]
    finally:
        os.close(fd)
        os.unlink(name)


def write_rank(src: ZeroCheckpoint, plan: list[GroupPlan], out: Path, rank: int,
               ep_size: int, progress=None) -> Path:  # fmt: skip
    """Write new rank ``rank``'s ZeRO shard into ``out``."""
    from deepspeed.utils.tensor_fragment import fragment_address

    first = src.shards[0]
    saved_groups = first["base_optimizer_state"]["param_groups"]
    dense_groups = [g for g, moe in enumerate(src.group_moe) if not moe]
    moe_groups = [g for g, moe in enumerate(src.group_moe) if moe]
    state, fp32, mappings, group_paddings, param_groups = {}, [], [], [], []
    per_rank = max(src.num_experts, default=0) // ep_size
    for g, group in enumerate(plan):
        part = rank // ep_size if group.moe else rank
        ep_rank = rank % ep_size
        size = group.partition_size
        source_group = moe_groups[0] if group.moe else dense_groups[g]
        keys = ["fp32", *src.value_keys(source_group)]
        buffers = {key: _scratch(out, size) for key in keys}
        mapping = OrderedDict()
        for name, (start, numel, offset) in group.fragments(part).items():
            source = global_expert_name(name, ep_rank, per_rank) if group.moe else name
            values = src.read(source)
            for key, value in values.items():
                buffers[key].narrow(0, start, numel).copy_(value.view(-1).narrow(0, offset, numel))
            mapping[name] = fragment_address(numel=numel, start=start)
            if progress is not None:
                progress.update(1)
        padding = group.padding(part)
        fp32.append(buffers.pop("fp32")[: size - padding])
        state[g] = {**copy.deepcopy(src.group_scalars(source_group)), **buffers}
        hparams = dict(saved_groups[source_group])
        if group.moe:
            hparams["name"] = f"ep_size_{ep_size}"
        hparams["params"] = [g]
        param_groups.append(hparams)
        mappings.append(mapping)
        group_paddings.append(padding)
    osd = {k: v for k, v in first.items()}
    osd.update(
        base_optimizer_state={"state": state, "param_groups": param_groups},
        single_partition_of_fp32_groups=fp32,
        group_paddings=group_paddings,
        param_alignment_paddings=[list(group.paddings) for group in plan],
        partition_count=[group.dp_size for group in plan],
        param_slice_mappings=mappings,
    )
    name = zero_file(rank, src.zero_prefix)
    meta = {k: v for k, v in load_file(src.zero_files[0]).items() if k != "optimizer_state_dict"}
    torch.save({"optimizer_state_dict": osd, **meta}, out / name)
    return out / name


def fresh_rng_state(seed: int) -> dict:
    """python/numpy/torch RNG states (``omni_ds.ckpt.saver.rng_state`` format) seeded by ``seed``,
    for ranks that did not exist when the checkpoint was written."""
    return {
        "python": random.Random(seed).getstate(),
        "numpy": np.random.RandomState(seed % 2**32).get_state(),
        "torch": torch.Generator().manual_seed(seed).get_state(),
    }


def reshard_client_state(client: dict, world_size: int, ep_size: int, step: int) -> dict:
    """omni-ds's client state for ``world_size`` ranks: rank r keeps old rank r's RNG (new ranks
    get fresh seeded ones); the per-rank states are dealt by :func:`reshard_rank_states`."""
    client = dict(client)
    mine = client.get(CLIENT_KEY)
    if not isinstance(mine, dict):
        return client
    mine = dict(mine, world_size=world_size, ep_size=ep_size)
    if isinstance(mine.get("rng"), list):
        old = mine["rng"]
        mine["rng"] = [old[r] if r < len(old) else fresh_rng_state(1_000_003 * step + r)
                       for r in range(world_size)]  # fmt: skip
    if isinstance(mine.get("data"), list) and mine["data"]:
        mine["data"] = reshard_rank_states(mine["data"], world_size)
    client[CLIENT_KEY] = mine
    return client


def write_common(src: ZeroCheckpoint, plan: list[GroupPlan], out: Path, world_size: int,
                 ep_size: int) -> None:  # fmt: skip
    """The main file (new dp_world_size, param_shapes and client state) and the expert files."""
    main = dict(src.main)
    main["dp_world_size"] = world_size
    main["param_shapes"] = [OrderedDict((k, src.shape(k)) for k in group.names) for group in plan]
    main = reshard_client_state(main, world_size, ep_size, int(main.get("global_steps") or 0))
    torch.save(main, out / MAIN_FILE)
    for f in src.expert_files:
        load_file(f)  # a damaged expert file is named here rather than copied
        shutil.copyfile(f, out / f.name)


def mark_complete(out: Path, src: ZeroCheckpoint, world_size: int, ep_size: int) -> None:
    """The manifest of the resharded ``out``, written last: omni-ds's step (DeepSpeed's
    ``global_steps`` for a checkpoint omni-ds did not write) and where it was resharded from."""
    client = src.main.get(CLIENT_KEY)
    if isinstance(client, dict) and "step" in client:
        step = client["step"]
    else:
        step = int(src.main.get("global_steps") or 0)
    write_manifest(out, step=step, world_size=world_size, ep_size=ep_size,
                   resharded_from=str(src.tag_dir))  # fmt: skip


def reshard(src_path: str | Path, out: str | Path, *, world_size: int, ep_size: int,
            progress: bool = False) -> Path:  # fmt: skip
    """Write the checkpoint at ``src_path`` for ``world_size`` ranks and ``ep_size`` into the tag
    directory ``out`` (created; must not hold a checkpoint already)."""
    src = ZeroCheckpoint(src_path)
    check_layout(src, world_size, ep_size)
    out = Path(out)
    if (out / MAIN_FILE).exists():
        raise CheckpointError(f"{out} already holds a checkpoint; pick an empty --out directory")
    plan = src.plan(world_size, ep_size)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(len(g.fragments(0)) for g in plan) * world_size
        bar = tqdm(total=total, desc="reshard", unit="slice", file=sys.stderr)
    for rank in range(world_size):
        write_rank(src, plan, out, rank, ep_size, bar)
    if bar is not None:
        bar.close()
    write_common(src, plan, out, world_size, ep_size)
    mark_complete(out, src, world_size, ep_size)
    return out


def reshard_for_resume(path: Path, world_size: int, ep_size: int) -> Path:
    """Collective (every rank calls it): reshard ``path`` into the sibling
    ``<tag>.reshard-w<W>-ep<K>/`` for this run's layout, each rank writing its own shard, and
    return it; a complete earlier result is reused, other earlier ones are deleted."""
    rank = dist.rank()
    out = resharded_dir(path, world_size, ep_size)
    # Every rank must take the same branch: rank 0 decides.
    if not dist.broadcast_object(_complete(out, world_size, ep_size)):
        started = time.perf_counter()
        src = ZeroCheckpoint(path)
        check_layout(src, world_size, ep_size)
        plan = src.plan(world_size, ep_size)
        if rank == 0:
            # Earlier reshards are copies that their originals reproduce: keep one at a time.
            for old in path.parent.glob(RESHARDED):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
            out.mkdir(parents=True)
        dist.barrier()
        write_rank(src, plan, out, rank, ep_size)
        if rank == 0:
            write_common(src, plan, out, world_size, ep_size)
        dist.barrier()
        if rank == 0:
            mark_complete(out, src, world_size, ep_size)
            print(f"resharded {path} ({src.world_size} ranks, ep_size {src.ep_size}) for "
                  f"{world_size} ranks, ep_size {ep_size}: {len(src.names())} parameters with "
                  f"their Adam state into {out} in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    elif rank == 0:
        print(f"resuming from {out}, resharded earlier from {path}", file=sys.stderr, flush=True)
    dist.barrier()
    return out


def _complete(out: Path, world_size: int, ep_size: int) -> bool:
    manifest = read_manifest(out)
    return manifest is not None and (manifest["world_size"], manifest["ep_size"]) == (
        world_size,
        ep_size,
    )
