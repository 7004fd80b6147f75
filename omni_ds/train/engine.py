"""A DeepSpeed engine for an MoE model, from a JSON in ``ds_configs/``.

The JSON stays authoritative for what DeepSpeed owns (batch sizes, optimizer, scheduler, ZeRO
stage, precision, clipping, monitors); omni-ds only points its monitors into the run directory and
hands DeepSpeed the parameters split into dense and expert groups, so that ZeRO partitions and
reduces expert gradients over the expert-data-parallel group instead of the whole world.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

MONITORS = ("tensorboard", "csv_monitor", "wandb", "comet")


def ds_config_for_run(ds_config: dict, run_dir: Path) -> dict:
    """A copy of ``ds_config`` whose enabled monitors write under ``run_dir`` when relative."""
    ds_config = copy.deepcopy(ds_config)
    for name in MONITORS:
        section = ds_config.get(name)
        if isinstance(section, dict) and section.get("enabled"):
            out = Path(section.get("output_path") or name)
            section["output_path"] = str(out if out.is_absolute() else run_dir / out)
            section.setdefault("job_name", "train")
    return ds_config


def moe_param_groups(model: torch.nn.Module) -> list[dict]:
    """Dense parameters in one group, each expert-parallel group's experts in their own."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    dense = {"name": "dense", "params": [p for p in model.parameters() if p.requires_grad]}
    return split_params_into_different_moe_groups_for_optimizer(dense)


def build_engine(model: torch.nn.Module, ds_config: dict):
    """``deepspeed.initialize`` with MoE parameter groups; returns the engine (optimizer and
    scheduler live inside it, built from the JSON)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=moe_param_groups(model), config=ds_config
    )
    return engine
