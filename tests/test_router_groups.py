"""model.moe.router_groups: consecutive groups of MoE layers, one router each (1 = omni, L = Switch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omni_ds.config.experiment import load_config
from omni_ds.config.model import ModelConfig, MoEConfig
from omni_ds.errors import ConfigError
from omni_ds.model.encoder import build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny(*overrides: str) -> ModelConfig:
    return load_config(CONFIGS / "tiny.yaml", ["model.dropout=0.0", *overrides]).model


def seeded(cfg: ModelConfig, seed: int = 3):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def audio(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([16000, 11000, 6400])
    x = torch.randn(3, 16000, generator=g) * 0.1
    return x.masked_fill(torch.arange(16000)[None] >= lens[:, None], 0.0), lens


def outputs(model):
    out = model(*audio(), return_stats=True)
    return out.logits, [s.expert for s in out.routing], out.balance_loss


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_one_group_is_the_omni_router_bitwise():
    omni, grouped = seeded(tiny()), seeded(tiny("model.moe.router_groups=1"))
    assert omni.state_dict().keys() == grouped.state_dict().keys()
    assert all(torch.equal(v, grouped.state_dict()[k]) for k, v in omni.state_dict().items())
    assert_same(outputs(omni), outputs(grouped))
    assert not hasattr(grouped, "routers") and grouped.router is not None


def test_one_group_per_layer_is_switch_bitwise():
    switch = seeded(tiny("model.moe.router=switch"))
    per_layer = seeded(tiny("model.moe.router_groups=4"))
    # the same draws in the same order: every switch weight is there, the groups' routers are
    # registered once more under routers.<g>
    theirs, ours = switch.state_dict(), per_layer.state_dict()
    extra = set(ours) - set(theirs)
    assert set(theirs) <= set(ours) and extra == {f"routers.{g}.wg.weight" for g in range(4)}
    assert all(torch.equal(v, ours[k]) for k, v in theirs.items())
    assert_same(outputs(switch), outputs(per_layer))
    routers = [b.ffn.router for b in per_layer.blocks]
    assert len({id(r) for r in routers}) == 4 and routers[2] is per_layer.routers[2]


def test_two_groups_share_a_router_within_each_group():
    model = build_model(tiny("model.moe.router_groups=2"))
    ids = [id(b.ffn.router) for b in model.blocks]
    assert ids[0] == ids[1] != ids[2] == ids[3]
    omni = build_model(tiny())
    counts = [
        m.parameter_counts()[0]
        for m in (omni, model, build_model(tiny("model.moe.router_groups=4")))
    ]
    d, E = 64, 4
    assert [c - counts[0] for c in counts] == [0, 1 * E * d, 3 * E * d]  # groups x E x d routers
    names = [n for n, _ in model.named_parameters() if "wg" in n]
    assert names == ["routers.0.wg.weight", "routers.1.wg.weight"]


def test_released_grammar_and_uneven_groups():
    cfg = ModelConfig(n_layers=16, moe=MoEConfig(num_experts=4, router_groups="4x4-4x4-4x4-4x4"))
    assert cfg.moe.group_sizes(cfg.moe_layers) == [4, 4, 4, 4]
    assert ModelConfig(n_layers=16, moe=MoEConfig(router_groups=8)).moe.group_sizes(16) == [2] * 8
    refused = {
        3: "use one of [1, 2, 4, 8, 16]",
        "4x4-4x4": "covers 8 MoE layers, the model has 16",
        "8x4-4x4-4x4": "uneven",
        "4x8-4x8-4x8-4x8": "write 4x4",
        "four": "is not LAYERSxEXPERTS",
    }
    for groups, fix in refused.items():
        with pytest.raises(ConfigError, match=r"model\.moe\.router_groups") as e:
            ModelConfig(n_layers=16, moe=MoEConfig(num_experts=4, router_groups=groups))
        assert fix in str(e.value)
    with pytest.raises(ConfigError, match="needs router: omni"):
        MoEConfig(router="switch", router_groups=2)
    # with moe_every 2 the groups split the MoE layers (8 of 16 blocks), not the blocks
    with pytest.raises(ConfigError, match="the 8 MoE layers"):
        ModelConfig(n_layers=16, moe_every=2, moe=MoEConfig(router_groups=16))
