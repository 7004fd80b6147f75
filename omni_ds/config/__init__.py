"""Typed experiment configs from YAML and the pre-flight checks of ``omni-ds check-config``.

    from omni_ds.config import load_config
    cfg = load_config("configs/tiny.yaml", ["model.moe.router=switch"])   # ExperimentConfig

| module | holds |
| --- | --- |
| ``loading`` | YAML → dataclasses: unknown keys, types, did-you-mean, ``--set`` overrides |
| ``model`` | ``model:`` — ``ModelConfig``, ``FrontendConfig``, ``MoEConfig`` |
| ``train`` | ``train:`` and ``checkpoint:`` — ``TrainConfig``, ``CheckpointConfig`` |
| ``experiment`` | ``ExperimentConfig`` (all sections; ``data:`` is ``data_pipeline.config``) |
| ``checks`` | every problem of an experiment and its DeepSpeed JSON, before a rank starts |
"""

from omni_ds.config.experiment import ExperimentConfig, load_config
from omni_ds.config.loading import from_dict, to_dict

__all__ = ["ExperimentConfig", "from_dict", "load_config", "to_dict"]
