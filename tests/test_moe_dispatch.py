"""omni_ds.dispatch: the padding-free grouped dispatch equals DeepSpeed's stock dispatch.

(With two ranks, also with the ``grouped_mm`` expert kernel; ``test_expert_kernel.py`` compares
the kernels in one process.)

Same routing, fresh random inputs, top-1/top-2, with and without capacity drops, skewed routing,
for ep_size 1 (in process) and 2 (two gloo ranks, all-to-all with split sizes); outputs and the
gradients of inputs, router and experts are compared.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_function

from omni_ds.config.model import MoEConfig
from omni_ds.model.moe import MoEFeedForward
from omni_ds.model.router import Router

E, D, F = 4, 16, 32
CASES = [(k, dropless) for k in (1, 2) for dropless in (False, True)]
IDS = [f"top{k}-{'dropless' if d else 'drops'}" for k, d in CASES]


def layer(k, dropless, dispatch, ep_size=1, seed=0, kernel="auto") -> MoEFeedForward:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        router="switch", num_experts=E, top_k=k, dropless=dropless, capacity_factor=0.7,
        ep_size=ep_size, dispatch=dispatch, expert_kernel=kernel,
    )  # fmt: skip
    ffn = MoEFeedForward(cfg, D, F, router=Router(cfg, D))
    for expert in ffn.experts:  # DeepSpeed deep-copies one expert: make them differ
        for p in expert.parameters():
            torch.nn.init.normal_(p, std=0.3)
    # Skew: expert 0 takes most frames, as silence does in speech.
    ffn.router.wg.weight.data[0] += 0.3
    return ffn


def inputs(seed: int, lengths: list[int]):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), D, generator=g) + 0.5
    pad = torch.arange(max(lengths))[None] >= torch.tensor(lengths)[:, None]
    return x.requires_grad_(), pad


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference over the tensor's scale: summation order differs between dispatches."""
    if not want.numel():
        return 0.0
    return float((got - want).abs().max() / (1 + want.abs().max()))


def grads(ffn: MoEFeedForward, x, pad, seed: int) -> dict[str, torch.Tensor]:
    out = ffn(x, pad).out
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    named = dict(ffn.named_parameters())
    got = torch.autograd.grad((out * w).sum(), [x, *named.values()], allow_unused=True)
    result = {"out": out.detach(), "x": got[0]}
    result.update({n: g for n, g in zip(named, got[1:])})
    return result


@pytest.mark.parametrize("k, dropless", CASES, ids=IDS)
def test_grouped_equals_stock_in_one_process(k, dropless):
    grouped, stock = layer(k, dropless, "grouped"), layer(k, dropless, "stock")
    for seed in range(3):
        x, pad = inputs(seed, [37, 20, 29])
        counts = torch.bincount(grouped.router.route(x[~pad]).expert[:, 0], minlength=E)
        assert counts[0] > 0.4 * counts.sum(), "expert 0 should take the most frames"
        a, b = grads(grouped, x, pad, seed), grads(stock, x, pad, seed)
        assert a.keys() == b.keys() and all(v is not None for v in a.values())
        for name in a:
            assert relative_diff(a[name], b[name]) < 1e-6, name


def _ep2_worker(k: int, dropless: bool) -> dict[str, float]:
    from omni_ds.dist import distributed

    with distributed() as info:
        rank = info.rank
        torch.set_num_threads(1)
        reference = layer(k, dropless, "stock", ep_size=1)
        local = E // 2
        layers = {d: layer(k, dropless, d, ep_size=2) for d in ("grouped", "stock")}
        layers["grouped_mm"] = layer(k, dropless, "grouped", ep_size=2, kernel="grouped_mm")
        for ffn in layers.values():
            ffn.router.load_state_dict(reference.router.state_dict())
            for j, expert in enumerate(ffn.experts):
                expert.load_state_dict(reference.experts[rank * local + j].state_dict())
            ffn.moe.set_deepspeed_parallelism()
        # Uneven ranks: different lengths, and rank 1 holds fewer frames than min_capacity.
        lengths = [[30, 17], [3]][rank]
        diffs = {}
        for seed in range(2):
            x, pad = inputs(10 * seed + rank, lengths)
            want = grads(reference, x, pad, seed)
            # Expert gradients collect every rank's frames: sum the single-process references.
            for j in range(E):
                for name in [n for n in want if n.startswith(f"moe.deepspeed_moe.experts.deepspeed_experts.{j}.")]:  # fmt: skip
                    torch.distributed.all_reduce(want[name])
            for dispatch, ffn in layers.items():
                got = grads(ffn, x, pad, seed)
                for name, g in got.items():
                    ref_name = name
                    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
                    if name.startswith(prefix):
                        j, rest = name[len(prefix) :].split(".", 1)
                        ref_name = f"{prefix}{rank * local + int(j)}.{rest}"
                    diff = relative_diff(g, want[ref_name])
                    key = f"{dispatch}:{name}"
                    diffs[key] = max(diffs.get(key, 0.0), diff)
        return diffs


@pytest.mark.distributed
@pytest.mark.parametrize("k, dropless", CASES, ids=IDS)
def test_grouped_and_stock_equal_single_process_with_two_expert_parallel_ranks(k, dropless):
    per_rank = run_function(_ep2_worker, nprocs=2, args=(k, dropless), timeout=180)
    for rank, diffs in enumerate(per_rank):
        for kernel in ("grouped", "grouped_mm"):
            assert any(n.startswith(f"{kernel}:moe.deepspeed_moe.experts") for n in diffs)
        bad = {n: d for n, d in diffs.items() if d > 1e-6}
        assert not bad, f"rank {rank}: {bad}"
