"""Padding-free expert dispatch: every expert runs on exactly the frames routed to it.

DeepSpeed's ``MOELayer`` copies the routed frames into a dense [experts, capacity, d] buffer;
in dropless mode the capacity is the busiest expert's count, so compute and memory grow with
routing skew (one expert taking half of the frames makes every expert process half of them).
Here the kept routes are sorted by expert and each expert's FFN runs on its own contiguous rows.
With ``ep_size > 1`` the rows travel by one all-to-all with split sizes (exact counts, exchanged
first by a tiny all-to-all of per-expert counts) instead of the padded buffer, and come back the
same way. On the CPU and on GPUs a loop over the (few) local experts is as fast as a grouped GEMM
at these sizes (``benchmarks/moe_layer.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from omni_ds.model.router import Routing


class _AllToAllV(torch.autograd.Function):
    """``all_to_all_single`` with split sizes; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group
        )
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAllV.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def run_experts(x: Tensor, counts: list[int], experts: nn.ModuleList) -> Tensor:
    """Rows of ``x`` grouped by local expert (``counts[i]`` rows each) through their experts."""
    # Every expert runs, even on zero rows, so each gets a (zero) gradient like the stock path:
    # ZeRO expects a gradient for every parameter.
    return torch.cat([e(chunk) for e, chunk in zip(experts, x.split(counts))])


def grouped_dispatch(
    tokens: Tensor, routing: Routing, experts: nn.ModuleList, ep_group, ep_size: int
) -> Tensor:
    """Apply the kept routes of ``routing`` to ``tokens`` [N, d]; returns the combined [N, d]."""
    n, k = routing.expert.shape
    num_experts = routing.prob.shape[1]
    kept = routing.kept.reshape(-1)
    expert = routing.expert.reshape(-1)[kept]
    order = torch.argsort(expert, stable=True)
    expert = expert[order]
    token = torch.arange(n, device=tokens.device).repeat_interleave(k)[kept][order]
    weight = routing.weight.reshape(-1)[kept][order]
    counts = torch.bincount(expert, minlength=num_experts)
    x = tokens.index_select(0, token)
    if ep_size == 1:
        y = run_experts(x, counts.tolist(), experts)
    else:
        y = _expert_parallel(x, counts, experts, ep_group, ep_size)
    # fp32 combine, like DeepSpeed's decode, then back to the activation dtype.
    out = tokens.new_zeros(tokens.shape, dtype=torch.float32)
    out.index_add_(0, token, y.float() * weight[:, None])
    return out.to(tokens.dtype)


def _expert_parallel(x: Tensor, counts: Tensor, experts: nn.ModuleList, group, ep_size: int):
    """Send rows (sorted by global expert) to the ranks owning the experts, run, send back."""
    local = len(experts)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    # received[s, j]: rows from rank s for local expert j, arriving grouped by s, then by j.
    received = received.view(ep_size, local)
    send = counts.view(ep_size, local).sum(1).tolist()
    recv = received.sum(1).tolist()
    rows = _AllToAllV.apply(x, send, recv, group)
    local_id = torch.arange(local, device=x.device).repeat(ep_size)
    local_id = local_id.repeat_interleave(received.reshape(-1))
    by_expert = torch.argsort(local_id, stable=True)
    y = run_experts(rows[by_expert], received.sum(0).tolist(), experts)
    y = y[torch.argsort(by_expert)]
    return _AllToAllV.apply(y, recv, send, group)
