"""Auxiliary-loss-free balancing (model.moe.expert_bias): what the bias changes, and its update."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moe_stack import MoEStack, batch

from omni_ds.config.model import MoEConfig
from omni_ds.errors import ConfigError
from omni_ds.model.balance import LoadMeter, update_biases
from omni_ds.model.router import Router

E, D = 4, 16


def cfg(**kw) -> MoEConfig:
    base = dict(router="omni", num_experts=E, dropless=True, expert_bias=True)
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("top_k", [1, 2])
def test_bias_changes_the_choice_not_the_combine_weights(top_k):
    torch.manual_seed(0)
    router = Router(cfg(top_k=top_k), D)
    x = torch.randn(50, D)
    plain = router.route(x)
    router.balance_bias[0, 2] = 5.0  # more than any probability gap: expert 2 wins everywhere
    biased = router.route(x)
    assert (biased.expert[:, 0] == 2).all() and not (plain.expert[:, 0] == 2).all()
    assert torch.equal(biased.prob, plain.prob)  # the router's distribution is untouched
    chosen = biased.prob.gather(1, biased.expert)
    if top_k == 1:
        assert torch.equal(biased.weight, chosen)  # the unbiased probability, not prob + bias
    else:
        assert torch.allclose(biased.weight, chosen / chosen.sum(1, keepdim=True))
    assert torch.equal(biased.load, torch.bincount(biased.expert.reshape(-1), minlength=E))
    assert not router.balance_bias.requires_grad
    assert "balance_bias" in router.state_dict() and "balance_bias" not in dict(
        router.named_parameters()
    )
    router.to(torch.bfloat16)  # what DeepSpeed's bf16 engine does to the module
    assert router.balance_bias.dtype == torch.float32 and router.wg.weight.dtype == torch.bfloat16


def skewed_stack(**kw) -> MoEStack:
    torch.manual_seed(0)
    stack = MoEStack(cfg(router_bias=True, balance_loss_weight=0.0, **kw), d_model=D, layers=2)
    with torch.no_grad():  # a router that sends almost every frame to expert 0
        stack.router.wg.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    return stack


def train(stack: MoEStack, steps: int) -> list[float]:
    """SGD on the toy task without a balance loss; the busiest expert's share at every step."""
    opt = torch.optim.SGD(stack.parameters(), lr=0.05)
    meter, busiest = LoadMeter(), []
    for step in range(steps):
        x, pad, y = batch(step, [12, 9, 16], d_in=6)
        logits, _, _, stats = stack.run(x, pad, return_stats=True)
        loss = torch.nn.functional.cross_entropy(logits[~pad], y[~pad])
        opt.zero_grad()
        loss.backward()
        opt.step()
        load = torch.stack([torch.bincount(s.expert.reshape(-1), minlength=E) for s in stats])
        busiest.append(float(load.sum(0).max() / load.sum()))
        meter.add(load)
        meter.update(stack)  # after the optimizer step, as the trainer does
    return busiest


@pytest.fixture
def one_thread():
    # tiny tensors: two intra-op threads on a loaded 2-core machine are 30x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bias_drives_a_skewed_router_to_balance_within_60_steps(one_thread):
    stack = skewed_stack(expert_bias_rate=0.02)
    balanced = train(stack, 60)
    control = train(skewed_stack(expert_bias_rate=0.0), 60)  # a bias that never moves
    bias = stack.router.balance_bias[0]
    assert bias[0] < 0 < bias[1:].min()  # the busy expert pushed down, the idle ones up
    assert balanced[0] > 0.9 and control[0] > 0.9  # even would be 0.25
    late = sum(balanced[-20:]) / 20
    assert late < 0.55, balanced
    assert min(control[-20:]) > 0.9, control


def test_shared_router_bias_follows_the_summed_load_or_each_layer():
    load = torch.tensor([[10, 2, 4, 4], [0, 8, 6, 6]])  # two layers, one router
    shared, per_layer = skewed_stack(), skewed_stack(expert_bias_per_layer=True)
    update_biases(shared, load)
    update_biases(per_layer, load)
    # summed: [10, 10, 10, 10] is even, nothing moves
    assert torch.equal(shared.router.balance_bias, torch.zeros(1, E))
    rate = shared.cfg.expert_bias_rate
    # per layer: the overloaded expert down, the others up, recentred to mean 0
    expected = torch.tensor([[-1.5, 0.5, 0.5, 0.5], [1.5, -0.5, -0.5, -0.5]]) * rate
    assert per_layer.router.balance_bias.shape == (2, E)
    assert torch.allclose(per_layer.router.balance_bias, expected)


def test_expert_bias_config_combinations():
    with pytest.raises(ConfigError, match="expert_bias.*dense"):
        MoEConfig(router="dense", expert_bias=True)
    with pytest.raises(ConfigError, match="second_expert_sampling"):
        MoEConfig(top_k=2, expert_bias=True, second_expert_sampling=True)
    with pytest.raises(ConfigError, match="expert_bias_rate"):
        MoEConfig(expert_bias=True, expert_bias_rate=-1.0)
    no_bias = dataclasses.replace(cfg(), expert_bias=False)
    assert (
        Router(no_bias, D).balance_bias is None
        and "balance_bias" not in Router(no_bias, D).state_dict()
    )
