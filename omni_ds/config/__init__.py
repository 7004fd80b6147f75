"""Typed experiment configs from YAML and the pre-flight checks of ``omni-ds check-config``.

    from omni_ds.config import load_config
    cfg = load_config("configs/tiny.yaml", ["model.moe.router=switch"])   # ExperimentConfig

| module | holds |
| --- | --- |
| ``loading`` | YAML → dataclasses: unknown keys, types, did-you-mean, ``--set`` overrides |
| ``model`` | ``model:`` — ``ModelConfig``, ``FrontendConfig``, ``MoEConfig`` |
| ``train`` | ``train:`` and ``checkpoint:`` — ``TrainConfig``, ``CheckpointConfig`` |
| ``experiment`` | ``ExperimentConfig`` (all sections; ``data:`` is ``data_pipeline.config``) |
| ``checks`` | ``preflight``: every problem of an experiment and its DeepSpeed JSON, before a rank starts |
| ``ds_json`` | the DeepSpeed JSON as DeepSpeed reads it (HJSON), ``"auto"`` resolved, batch keys |
| ``ds_schema`` | DeepSpeed's own parser and pydantic models, every rejected key at once |
| ``presets`` | the shipped ``configs/``, ``ds_configs/``, ``slurm/`` files, by name or path |
| ``data_ready`` | data readiness: sources, usable samples, tokenizer coverage |
"""

from omni_ds.config.experiment import ExperimentConfig, load_config
from omni_ds.config.loading import from_dict, to_dict

__all__ = ["ExperimentConfig", "from_dict", "load_config", "to_dict"]
