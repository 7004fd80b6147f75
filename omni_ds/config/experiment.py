"""The experiment config: one typed section per component, as written in ``configs/*.yaml``.

cfg = load_config("configs/tiny.yaml", ["model.moe.router=switch"])
model = omni_ds.model.build_model(cfg.model)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_pipeline.config import DataConfig
from omni_ds.config.loading import apply_overrides, from_dict, load_yaml
from omni_ds.config.model import ModelConfig
from omni_ds.config.train import CheckpointConfig, TrainConfig
from omni_ds.errors import ConfigError


@dataclasses.dataclass(kw_only=True)
class ExperimentConfig:
    """Everything one run needs; each section is its component's own config dataclass."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The encoder: shape, front end, router mode and experts (``omni_ds.config.model``)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Train and dev shards, tokenizer, filters and batching (``data_pipeline.config``)."""
    deepspeed: Path = Path("ds_configs/zero2_bf16.json")
    """The DeepSpeed JSON (batch sizes, optimizer, scheduler, ZeRO stage, precision, clipping,
    monitors); authoritative for everything DeepSpeed owns. See README "Editing DeepSpeed JSON
    configs"."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Run directory, length, seed, logging and dev evaluation (``omni_ds.config.train``)."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """When to save, how many to keep, where to resume from (``omni_ds.config.train``)."""

    def __post_init__(self) -> None:
        if self.train.routing_trace_every and self.model.moe.router == "dense":
            raise ConfigError(
                f"train.routing_trace_every = {self.train.routing_trace_every} with model.moe."
                "router = 'dense': a dense model has no routing to trace; set it to 0"
            )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The experiment config of a YAML file; ``overrides`` are ``key.path=value`` strings, as
    given to ``omni-ds train --set``."""
    data = apply_overrides(load_yaml(path), list(overrides))
    return from_dict(ExperimentConfig, data)
