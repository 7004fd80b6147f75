"""omni_ds.router: one shared router, its gradient, DeepSpeed equivalence, padding, noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from deepspeed.moe.layer import MoE
from moe_stack import MoEStack, batch, untie

from omni_ds.config.model import MoEConfig
from omni_ds.errors import ConfigError
from omni_ds.model.moe import FeedForward, MoEFeedForward
from omni_ds.model.router import Router

E, D, L = 4, 16, 3


def cfg(**kw) -> MoEConfig:
    base = dict(num_experts=E, balance_loss_weight=0.1, z_loss_weight=0.01)
    return MoEConfig(**{**base, **kw})


def switch_layer(c: MoEConfig, d_model: int, d_ff: int) -> MoEFeedForward:
    """One MoE layer with its own router, as the encoder builds it for ``router: switch``."""
    return MoEFeedForward(c, d_model, d_ff, router=Router(c, d_model))


def router_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".wg." in n or n.startswith("router.")]


def test_omni_has_one_router_tensor_and_switch_minus_shared_params():
    torch.manual_seed(0)
    omni = MoEStack(cfg(router="omni"), layers=L)
    switch = untie(omni)
    assert [n for n, _ in router_params(omni)] == ["router.wg.weight"]
    assert len(router_params(switch)) == L
    assert all(ffn.router is omni.router for ffn in omni.ffns)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(omni) == count(switch) - (L - 1) * E * D


@pytest.mark.parametrize("k", [1, 2])
def test_shared_gradient_is_the_sum_of_per_layer_contributions(k):
    torch.manual_seed(1)
    omni = MoEStack(cfg(top_k=k, capacity_factor=1.0), layers=L)
    switch = untie(omni)
    x, pad, y = batch(0, [20, 13, 17])
    omni.loss(x, pad, y).backward()
    switch.loss(x, pad, y).backward()
    per_layer = [ffn.router.wg.weight.grad for ffn in switch.ffns]
    assert all(g.abs().sum() > 0 for g in per_layer), "every layer must contribute"
    torch.testing.assert_close(omni.router.wg.weight.grad, sum(per_layer), rtol=1e-5, atol=1e-7)


def _stock_pair(k: int, dropless: bool, dispatch: str):
    """Our switch layer and a stock DeepSpeed MoE layer holding the same weights."""
    c = cfg(router="switch", top_k=k, dropless=dropless, capacity_factor=0.5, dispatch=dispatch)
    ours = switch_layer(c, D, 32)
    stock = MoE(
        D, FeedForward(D, 32), num_experts=E, k=k, capacity_factor=0.5,
        min_capacity=c.min_capacity, drop_tokens=not dropless, use_rts=False,
        top2_2nd_expert_sampling=False,
    )  # fmt: skip
    stock.load_state_dict(ours.moe.state_dict())
    return ours, stock


@pytest.mark.parametrize("dispatch", ["grouped", "stock"])
@pytest.mark.parametrize("dropless", [False, True], ids=["drops", "dropless"])
@pytest.mark.parametrize("k", [1, 2])
def test_switch_reproduces_stock_deepspeed_moe(k, dropless, dispatch):
    torch.manual_seed(2)
    ours, stock = _stock_pair(k, dropless, dispatch)
    x = torch.randn(3, 24, D, requires_grad=True)
    res = ours(x)
    out, l_aux, _ = stock(x)
    kept = ours.router.route(x.reshape(-1, D)).kept
    assert kept.all() == dropless  # capacity 0.5: the comparison includes dropped routes
    torch.testing.assert_close(res.out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.balance_loss, l_aux)
    g_ours = torch.autograd.grad(res.out.square().sum(), [x, ours.router.wg.weight])
    g_stock = torch.autograd.grad(out.square().sum(), [x, stock.deepspeed_moe.gate.wg.weight])
    for a, b in zip(g_ours, g_stock):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["grouped", "stock"])
@pytest.mark.parametrize("dropless", [False, True], ids=["drops", "dropless"])
@pytest.mark.parametrize("k", [1, 2])
def test_appended_padding_changes_neither_outputs_nor_losses(k, dropless, dispatch):
    torch.manual_seed(3)
    model = MoEStack(cfg(top_k=k, dropless=dropless, capacity_factor=0.8, dispatch=dispatch))
    lengths = [19, 11, 16]
    x, pad, _ = batch(4, lengths)
    x_long, pad_long, _ = batch(4, lengths, pad_to=40)
    x_long[:, : x.shape[1]] = x
    # Garbage in the pad frames: it must not leak anywhere.
    x_long = torch.where(pad_long[..., None], torch.randn_like(x_long) * 100, x_long)
    logits, balance, z, stats = model.run(x, pad, return_stats=True)
    logits_l, balance_l, z_l, stats_l = model.run(x_long, pad_long, return_stats=True)
    torch.testing.assert_close(logits_l[:, : x.shape[1]][~pad], logits[~pad])
    torch.testing.assert_close(balance_l, balance)
    torch.testing.assert_close(z_l, z)
    for s, s_l in zip(stats, stats_l):
        assert s.expert.shape == (sum(lengths), k)
        assert torch.equal(s.expert, s_l.expert)
        torch.testing.assert_close(s.usage, s_l.usage)


def test_stock_used_token_is_not_padding_invariant():
    """Why the router sees only real frames: DeepSpeed's own mask leaves P_i counting pads."""
    torch.manual_seed(5)
    _, stock = _stock_pair(1, False, "stock")
    x = torch.randn(1, 16, D)
    padded = torch.cat([x, torch.randn(1, 16, D)], dim=1)
    used = torch.cat([torch.ones(16), torch.zeros(16)])
    l_aux = stock(x)[1]
    l_aux_padded = stock(padded, used)[1]
    assert not torch.allclose(l_aux, l_aux_padded)


def test_stats_follow_real_frames_in_row_major_order():
    torch.manual_seed(6)
    layer = switch_layer(cfg(router="switch", top_k=2), D, 32)
    x = torch.randn(2, 7, D)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    stats = layer(x, pad, return_stats=True).stats
    routing = layer.router.route(x[~pad])
    assert torch.equal(stats.expert, routing.expert)
    torch.testing.assert_close(stats.prob, routing.prob.gather(1, routing.expert))
    assert stats.expert.shape == (12, 2) and (stats.expert[:, 0] != stats.expert[:, 1]).all()
    assert abs(float(stats.usage.sum()) - 1) < 1e-6
    assert 0 < float(stats.entropy) <= torch.log(torch.tensor(float(E)))


def test_random_routing_ablation_is_eval_only_and_changes_experts():
    torch.manual_seed(7)
    layer = switch_layer(cfg(router="switch", dropless=True), D, 32)
    x = torch.randn(4, 50, D)
    with pytest.raises(RuntimeError, match="eval-only"):
        layer.random_routing = True
        layer(x)
    layer.random_routing = False
    layer.eval()
    routed = layer(x, return_stats=True)
    ablated = layer(x, return_stats=True)
    assert torch.equal(routed.stats.expert, ablated.stats.expert)  # eval without noise: stable
    layer.random_routing = True
    ablated = layer(x, return_stats=True)
    agree = (ablated.stats.expert == routed.stats.expert).float().mean()
    assert agree < 0.5 and set(ablated.stats.expert.unique().tolist()) == set(range(E))
    assert not torch.allclose(ablated.out, routed.out)


def test_noise_only_in_training_and_jitter_changes_routing_weights():
    torch.manual_seed(8)
    c = cfg(router="switch", top_k=2, jitter=0.2, use_rts=True, second_expert_sampling=True)
    layer = switch_layer(c, D, 32)
    x = torch.randn(64, D)
    a, b = layer.router.route(x), layer.router.route(x)
    assert not torch.equal(a.weight, b.weight)
    layer.eval()
    a, b = layer.router.route(x), layer.router.route(x)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert, b.expert)


def test_bf16_cast_keeps_the_router_tied():
    torch.manual_seed(9)
    model = MoEStack(cfg(top_k=2)).to(torch.bfloat16)
    weights = {id(ffn.router.wg.weight) for ffn in model.ffns} | {id(model.router.wg.weight)}
    assert len(weights) == 1 and model.router.wg.weight.dtype == torch.bfloat16
    x, pad, y = batch(10, [12, 9])
    model.loss(x.bfloat16(), pad, y).backward()
    assert model.router.wg.weight.grad.abs().sum() > 0
    assert len(router_params(model)) == 1


def test_router_bias_is_shared_too():
    model = MoEStack(cfg(router_bias=True))
    assert [n for n, _ in router_params(model)] == ["router.wg.weight", "router.wg.bias"]
    x, pad, y = batch(11, [10, 8])
    model.loss(x, pad, y).backward()
    assert model.router.wg.bias.grad.abs().sum() > 0


def test_set_ep_group_accepts_the_same_group_again_but_not_another():
    router = Router(cfg(), D)
    group, other = object(), object()
    router._set_ep_group(group)
    router._set_ep_group(group)  # the engine calls it once per MoE layer
    with pytest.raises(RuntimeError, match="one expert-parallel group"):
        router._set_ep_group(other)


def test_config_errors_name_key_value_and_fix():
    with pytest.raises(ConfigError, match=r"moe.top_k = 3: use 1 or 2"):
        cfg(top_k=3)
    with pytest.raises(ConfigError, match=r"moe.ep_size = 3: use a divisor of num_experts \(4\)"):
        cfg(ep_size=3)
    with pytest.raises(ConfigError, match="moe.router = 'mixed'"):
        cfg(router="mixed")
    assert dataclasses.replace(cfg(), jitter=0.1).jitter == 0.1


def test_experts_start_different_but_reproducibly():
    torch.manual_seed(12)
    a = switch_layer(cfg(router="switch"), D, 32)
    torch.manual_seed(12)
    b = switch_layer(cfg(router="switch"), D, 32)
    weights = [e.fc1.weight for e in a.experts]
    assert all(not torch.equal(weights[0], w) for w in weights[1:])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("dispatch", ["grouped", "stock"])
@pytest.mark.parametrize("k", [1, 2])
def test_fewer_real_frames_than_min_capacity_and_none_at_all(k, dispatch):
    # DeepSpeed's top-1 gating asserts frames >= min_capacity; a short utterance must just work.
    layer = switch_layer(cfg(router="switch", top_k=k, dispatch=dispatch, min_capacity=8), D, 32)
    x = torch.randn(2, 5, D, requires_grad=True)
    pad = torch.ones(2, 5, dtype=torch.bool)
    pad[0, :3] = False
    res = layer(x, pad)
    assert res.out[~pad].abs().sum() > 0 and (res.out[pad] == 0).all()
    empty = layer(x, torch.ones(2, 5, dtype=torch.bool), return_stats=True)
    assert (empty.out == 0).all() and empty.stats.expert.shape == (0, k)
    assert empty.balance_loss.item() == 0 and empty.z_loss.item() == 0
    (empty.out.sum() + empty.balance_loss + empty.z_loss).backward()


def test_router_is_a_drop_in_gate_for_stock_moe_with_used_token():
    """Called by DeepSpeed's own MoE.forward with its used_token mask, pads are never routed."""
    torch.manual_seed(13)
    ours, stock = _stock_pair(2, False, "stock")
    stock.deepspeed_moe.gate = ours.router
    x = torch.randn(2, 9, D)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 4:] = True
    out, l_aux, _ = stock(x, (~pad).reshape(-1).float())
    res = ours(x, pad)
    torch.testing.assert_close(out, res.out)
    torch.testing.assert_close(l_aux, res.balance_loss)
    assert (out[pad] == 0).all()
