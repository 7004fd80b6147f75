"""The experiment config: one typed section per component, as written in ``configs/*.yaml``.

cfg = omni_ds.config.load_config("configs/tiny.yaml", ["model.moe.router=switch"])
model = omni_ds.model.build_model(cfg.model)
"""

from __future__ import annotations

import dataclasses

from omni_ds.model import ModelConfig


@dataclasses.dataclass(kw_only=True)
class ExperimentConfig:
    """Everything one run needs; each section is its component's own config dataclass."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The encoder: shape, front end, router mode and experts (``omni_ds.model.ModelConfig``)."""
