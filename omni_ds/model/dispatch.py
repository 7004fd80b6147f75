"""Padding-free expert dispatch: every expert runs on exactly the frames routed to it.

DeepSpeed's ``MOELayer`` copies the routed frames into a dense [experts, capacity, d] buffer;
in dropless mode the capacity is the busiest expert's count, so compute and memory grow with
routing skew (one expert taking half of the frames makes every expert process half of them).
Here the kept routes are sorted by expert and each expert's FFN runs on its own contiguous rows.
With ``ep_size > 1`` the rows travel by one all-to-all with split sizes (exact counts, exchanged
first by a tiny all-to-all of per-expert counts) instead of the padded buffer, and come back the
same way.

The expert kernel (``model.moe.expert_kernel``): ``loop`` runs the local experts one after the
other on their row blocks; ``grouped_mm`` runs all of them as one ``torch._grouped_mm`` per
linear layer (the experts' weights stacked, no host sync on the row counts). ``auto`` takes the
loop on CPUs, where ``benchmarks/moe_layer.py`` measured ``_grouped_mm`` 1.04-1.09x slower
(16k tokens, fp32), and the grouped GEMM for bf16 on CUDA GPUs of compute capability 9.0+, where
``_grouped_mm`` has its CUTLASS kernel and torchtitan runs its experts through it (the H200 ratio
is part 3 of ``benchmarks/gpu_check.sh``, not yet run); other dtypes and older GPUs, and any
torch that cannot run it (:func:`grouped_mm_problem`), take the loop.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from omni_ds.model.router import Routing

EXPERT_KERNELS = ("auto", "loop", "grouped_mm")


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


@functools.cache
def grouped_mm_problem(device_type: str, device_index: int | None, dtype: torch.dtype) -> str:
    """Why ``torch._grouped_mm`` cannot train here ('' if it can), from one tiny probe.

    Its support differs by torch version (CPU kernels are in 2.13, not in older releases; CUDA
    builds before 2.8 lack it; the CUTLASS kernel wants bf16 on compute capability 9.0+), so
    the probe runs what the expert kernel needs: a 2D x 3D product with offsets, and its backward.
    """
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    device = torch.device(device_type, device_index)
    try:
        # A private generator: the probe runs at a process's first forward, so a draw from the
        # global RNG would shift a resumed run's dropout away from the straight run's.
        g = torch.Generator(device=device).manual_seed(0)
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x = torch.randn(5, 8, generator=g, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 8, 8, generator=g, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 5], device=device, dtype=torch.int32)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            (y * torch.randn(y.shape, generator=g, device=device, dtype=dtype)).sum().backward()
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"torch {torch.__version__}: torch._grouped_mm fails on {device} for {dtype}: {first}"
        )
    return ""


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def resolve_kernel(kernel: str, x: Tensor, experts: nn.ModuleList) -> str:
    """``loop`` or ``grouped_mm`` for ``kernel`` (``auto``/``loop``/``grouped_mm``) on these rows.

    A forced ``grouped_mm`` that cannot run raises, naming the reason and the fix; ``auto``
    takes the loop wherever the grouped GEMM is not the measured faster choice or cannot run.
    """
    if kernel == "loop":
        return "loop"
    dtype = compute_dtype(x)
    problem = grouped_mm_problem(x.device.type, x.device.index, dtype)
    if not problem:
        problem = _shape_problem(experts, dtype)
    if kernel == "grouped_mm":
        if problem:
            raise RuntimeError(
                f"model.moe.expert_kernel = 'grouped_mm': {problem}; use expert_kernel: loop "
                "(or auto, which falls back to the loop)"
            )
        return "grouped_mm"
    if kernel != "auto":
        raise ValueError(f"expert kernel {kernel!r}: use one of {EXPERT_KERNELS}")
    fast = (
        x.device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )
    return "grouped_mm" if fast and not problem else "loop"


def _shape_problem(experts: nn.ModuleList, dtype: torch.dtype) -> str:
    # _grouped_mm reads its operands with 16-byte aligned rows.
    fc1 = experts[0].fc1
    width = 16 // torch.empty((), dtype=dtype).element_size()
    if fc1.in_features % width or fc1.out_features % width:
        return (
            f"d_model {fc1.in_features} and d_ff {fc1.out_features} must be multiples of "
            f"{width} for {dtype} (16-byte rows)"
        )
    return ""


def run_experts(x: Tensor, counts: Tensor, experts: nn.ModuleList, kernel: str = "loop") -> Tensor:
    """Rows of ``x`` grouped by local expert (``counts[i]`` rows each) through their experts.

    ``kernel`` is ``loop`` or ``grouped_mm`` (:func:`resolve_kernel`); both give every expert a
    gradient, zero for an expert without rows, as the stock path does: ZeRO expects a gradient for
    every parameter.
    """
    if kernel == "grouped_mm":
        return _grouped_mm_experts(x, counts, experts)
    return torch.cat([e(chunk) for e, chunk in zip(experts, x.split(counts.tolist()))])


def _grouped_mm_experts(x: Tensor, counts: Tensor, experts: nn.ModuleList) -> Tensor:
    """The experts' ``fc2(dropout(gelu(fc1(x))))`` as two grouped GEMMs over the row blocks."""
    dtype = compute_dtype(x)
    offs = counts.cumsum(0).to(torch.int32)
    # Row r belongs to expert of_row[r]; output_size avoids a host sync on the counts.
    of_row = torch.repeat_interleave(
        torch.arange(len(experts), device=x.device), counts, output_size=x.shape[0]
    )

    def linear(h: Tensor, name: str) -> Tensor:
        layers = [getattr(e, name) for e in experts]
        w = torch.stack([m.weight for m in layers]).to(dtype)  # [E, out, in]
        out = torch._grouped_mm(h, w.transpose(-2, -1), offs=offs)
        return out + torch.stack([m.bias for m in layers]).to(dtype).index_select(0, of_row)

    with torch.autocast(x.device.type, enabled=False):
        h = F.gelu(linear(x.to(dtype), "fc1"))
        h = experts[0].dropout(h)
        return linear(h, "fc2")


def grouped_dispatch(
    tokens: Tensor,
    routing: Routing,
    experts: nn.ModuleList,
    ep_group,
    ep_size: int,
    kernel: str = "auto",
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
    kernel = resolve_kernel(kernel, x, experts)
    if ep_size == 1:
        y = run_experts(x, counts, experts, kernel)
    else:
        y = _expert_parallel(x, counts, experts, ep_group, ep_size, kernel)
    # fp32 combine, like DeepSpeed's decode, then back to the activation dtype.
    out = tokens.new_zeros(tokens.shape, dtype=torch.float32)
    out.index_add_(0, token, y.float() * weight[:, None])
    return out.to(tokens.dtype)


def _expert_parallel(
    x: Tensor, counts: Tensor, experts: nn.ModuleList, group, ep_size: int, kernel: str
) -> Tensor:
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
    y = run_experts(rows[by_expert], received.sum(0), experts, kernel)
    y = y[torch.argsort(by_expert)]
    return _AllToAllV.apply(y, recv, send, group)
