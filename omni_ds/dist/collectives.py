"""Every collective omni-ds issues outside the model's own all-to-all, in one place.

Each function works unchanged in a single process (no process group: the identity) and under
gloo or NCCL; tensors go to the GPU only for NCCL, which cannot reduce CPU tensors. Every rank
must call each of them at the same point of its program: they are collectives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def _device() -> torch.device:
    return torch.device("cuda") if tdist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order, on every rank (picklable objects)."""
    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank: rank 0 decides for all (clocks, file-system checks)."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def agree(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks, in one all-reduce."""
    if not tdist.is_initialized():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Every value summed over ranks, in one all-reduce (every rank passes the same keys)."""
    if not tdist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    tdist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def sum_over_group(value: float, group) -> float:
    """``value`` summed over the ranks of ``group`` (e.g. one expert-parallel group)."""
    if not tdist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    tdist.all_reduce(t, group=group)
    return float(t.item())


def sum_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` summed over all ranks, on ``t``'s device (integer sums are exact)."""
    if not tdist.is_initialized():
        return t.clone()
    out = t.to(_device(), copy=True)
    tdist.all_reduce(out)
    return out.to(t.device)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Every value averaged over ranks (every rank passes the same keys)."""
    return {k: v / world_size() for k, v in sum_over_ranks(values).items()}


def sum_counts_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Counters whose keys may differ between ranks (e.g. skip reasons), summed over ranks."""
    total: dict[str, int] = {}
    for part in gather_objects(dict(counts)):
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))
