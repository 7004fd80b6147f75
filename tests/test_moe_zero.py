"""The shared router under DeepSpeed's engine: ZeRO-2, expert parallelism, activation checkpointing.

Two gloo ranks with ``ep_size=2`` each take half of every global batch; the reference is one
process with ``ep_size=1`` taking the same halves as two gradient-accumulation micro-steps, so both
see the same frames, the same per-rank capacities and the same averaged gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from harness import RankFailure, run_function
from moe_stack import MoEStack, batch

from omni_ds.config.model import MoEConfig

E, STEPS = 4, 3
LENGTHS = [[21, 14], [9, 17]]  # the two halves of each global batch (rank / micro-step)
EXPERTS = "ffns.{layer}.moe.deepspeed_moe.experts.deepspeed_experts.{expert}."


def global_names(model: MoEStack, ep_rank: int) -> dict[str, str]:
    """Parameter name on this rank -> name in the ep_size=1 reference (global expert ids)."""
    local = E // model.cfg.ep_size
    names = {}
    for name, _ in model.named_parameters():
        names[name] = name
        for layer in range(len(model.ffns)):
            for j in range(local):
                prefix = EXPERTS.format(layer=layer, expert=j)
                if name.startswith(prefix):
                    names[name] = EXPERTS.format(layer=layer, expert=ep_rank * local + j)
                    names[name] += name[len(prefix) :]
    return names


def _train(cfg: MoEConfig, checkpoint: str | None) -> dict:
    import deepspeed
    from deepspeed.utils import groups, safe_get_full_grad

    from omni_ds.dist import distributed
    from omni_ds.train.engine import _import_muon_uncompiled

    with distributed() as info:
        torch.set_num_threads(1)
        world = info.world_size
        torch.manual_seed(0)
        model = MoEStack(cfg, layers=2, checkpoint=checkpoint)
        ep_rank = info.rank % cfg.ep_size  # DeepSpeed's layout: consecutive ranks share experts
        names = global_names(model, ep_rank)
        # Experts are initialised per global id: the ep_size=1 model has the same weights.
        torch.manual_seed(0)
        reference = MoEStack(dataclasses.replace(cfg, ep_size=1), layers=2).state_dict()
        for name, value in model.state_dict().items():
            assert torch.equal(value, reference[names.get(name, name)]), name
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2 // world,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": 2},
            "gradient_clipping": 0.0,
        }
        _import_muon_uncompiled(config)  # as build_engine does: no Inductor import at start-up
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        assert groups._get_expert_parallel_rank(f"ep_size_{cfg.ep_size}") == ep_rank
        losses, routers, grads = [], [], []
        for step in range(STEPS):
            for micro in range(2 // world):
                half = LENGTHS[info.rank + micro]
                x, pad, y = batch(100 * step + info.rank + micro, half)
                loss = engine(x, pad, y)
                engine.backward(loss)
                losses.append(loss.item())
                if engine.is_gradient_accumulation_boundary():
                    params = model.named_parameters()
                    grads.append({names[n]: safe_get_full_grad(p) for n, p in params})
                engine.step()
            routers.append(model.router.wg.weight.detach().clone())
        return {"losses": losses, "routers": routers, "grads": grads}


def _compare(cfg: MoEConfig, checkpoint: str | None = None) -> None:
    ranks = run_function(_train, nprocs=2, args=(dataclasses.replace(cfg, ep_size=2), checkpoint))
    (single,) = run_function(_train, nprocs=1, args=(cfg, checkpoint))
    # The ranks' losses are the reference's micro-step losses, in rank order.
    for step in range(STEPS):
        got = [ranks[0]["losses"][step], ranks[1]["losses"][step]]
        torch.testing.assert_close(
            got, single["losses"][2 * step : 2 * step + 2], rtol=1e-5, atol=0
        )
        # The replicated router is bitwise identical on both ranks after every step.
        assert torch.equal(ranks[0]["routers"][step], ranks[1]["routers"][step])
        torch.testing.assert_close(ranks[0]["routers"][step], single["routers"][step])
        want = single["grads"][step]
        for rank in ranks:
            for name, g in rank["grads"][step].items():
                scale = 1 + want[name].abs().max()
                assert (g - want[name]).abs().max() < 1e-5 * scale, (step, name)
    assert "router.wg.weight" in want and sum(len(r["grads"][0]) for r in ranks) > len(want)


BASE = MoEConfig(num_experts=E, capacity_factor=1.0, balance_loss_weight=0.1, z_loss_weight=0.01)


@pytest.mark.distributed
@pytest.mark.parametrize("k", [1, 2])
def test_zero2_expert_parallel_matches_single_process(k):
    _compare(dataclasses.replace(BASE, top_k=k))


@pytest.mark.distributed
def test_zero2_with_non_reentrant_activation_checkpointing_and_shared_router():
    _compare(dataclasses.replace(BASE, dropless=True, dispatch="stock"), "non_reentrant")


@pytest.mark.distributed
def test_reentrant_checkpointing_reduces_the_shared_router_twice():
    """DeepSpeed issue 2103, still in 0.19.8: with reentrant checkpointing (torch's reentrant
    mode, deepspeed.checkpointing) each layer's backward fires the shared router's ZeRO-2 hook.
    The encoder must checkpoint with use_reentrant=False; if this starts passing, DeepSpeed fixed it.
    """
    cfg = dataclasses.replace(BASE, ep_size=2)
    with pytest.raises(RankFailure, match="router.wg.weight has already been reduced"):
        run_function(_train, nprocs=2, args=(cfg, "reentrant"))
