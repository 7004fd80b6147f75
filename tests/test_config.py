"""omni_ds.config: YAML to typed dataclasses, with errors that name the key, value and fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from omni_ds.config.loading import apply_overrides, from_dict, to_dict
from omni_ds.errors import ConfigError


@dataclasses.dataclass(kw_only=True)
class _Inner:
    num_experts: int = 8
    """Experts per MoE layer."""
    router: Literal["dense", "switch", "omni"] = "omni"
    """Routing mode."""


@dataclasses.dataclass(kw_only=True)
class _Outer:
    name: str
    """Run name."""
    lr: float = 1e-3
    """Peak learning rate."""
    shards: list[Path] = dataclasses.field(default_factory=list)
    """Shard paths."""
    moe: _Inner = dataclasses.field(default_factory=_Inner)
    """MoE section."""


def test_nested_mapping_becomes_typed_dataclasses():
    cfg = from_dict(_Outer, {"name": "x", "lr": 1, "shards": ["a.tar"], "moe": {"num_experts": 4}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.shards == [Path("a.tar")]
    assert cfg.moe == _Inner(num_experts=4)
    assert to_dict(cfg)["shards"] == ["a.tar"]


def test_unknown_key_names_the_dotted_path_and_suggests_the_fix():
    with pytest.raises(
        ConfigError, match=r"moe\.num_expert: unknown key; did you mean 'num_experts'"
    ):
        from_dict(_Outer, {"name": "x", "moe": {"num_expert": 4}})


def test_wrong_literal_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"moe\.router: 'omni2' is not allowed; use one of"):
        from_dict(_Outer, {"name": "x", "moe": {"router": "omni2"}})


def test_wrong_type_and_missing_key():
    with pytest.raises(ConfigError, match=r"moe\.num_experts: expected an integer, got '4x'"):
        from_dict(_Outer, {"name": "x", "moe": {"num_experts": "4x"}})
    with pytest.raises(ConfigError, match=r"name: required key is missing"):
        from_dict(_Outer, {})


def test_overrides_parse_values_as_yaml():
    data = apply_overrides(
        {"moe": {"num_experts": 8}}, ["moe.num_experts=4", "lr=3e-4", "name=run"]
    )
    assert data["moe"] == {"num_experts": 4}
    cfg = from_dict(_Outer, data)
    assert cfg.lr == 3e-4 and cfg.name == "run" and cfg.moe.num_experts == 4
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["moe.num_experts"])
