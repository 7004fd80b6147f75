"""A DeepSpeed engine for an MoE model, from a JSON in ``ds_configs/``.

The JSON stays authoritative for what DeepSpeed owns (batch sizes, optimizer, scheduler, ZeRO
stage, precision, clipping, monitors: TensorBoard, CSV, W&B, Comet as DeepSpeed documents them);
omni-ds only points the file monitors' relative paths into the run directory, gives a W&B run
the experiment's config, and hands DeepSpeed the parameters split into dense and expert groups,
so that ZeRO partitions and reduces expert gradients over the expert-data-parallel group instead
of the whole world.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

# The monitors that write files, and so take an output_path and a job_name; DeepSpeed's wandb
# (team, group, project) and comet sections have neither and its models reject extra keys.
FILE_MONITORS = ("tensorboard", "csv_monitor")


def ds_config_for_run(ds_config: dict, run_dir: Path) -> dict:
    """A copy of ``ds_config`` whose enabled file monitors write under ``run_dir`` when their
    ``output_path`` is relative or empty (``run_dir/<section name>`` then)."""
    ds_config = copy.deepcopy(ds_config)
    for name in FILE_MONITORS:
        section = ds_config.get(name)
        if isinstance(section, dict) and section.get("enabled"):
            out = Path(section.get("output_path") or name)
            section["output_path"] = str(out if out.is_absolute() else run_dir / out)
            section.setdefault("job_name", "train")
    return ds_config


def describe_run(engine, experiment: dict, ds_config: dict) -> None:
    """Give the W&B run (when the JSON enables it; rank 0 only) the resolved experiment config
    and the DeepSpeed config it trains with, beside the metrics the monitors receive."""
    if getattr(getattr(engine, "monitor", None), "wandb_monitor", None) is None:
        return
    import wandb

    wandb.config.update({"experiment": experiment, "deepspeed": ds_config},
                        allow_val_change=True)  # fmt: skip
    wandb.define_metric("train/step")
    for prefix in ("train/*", "dev/*"):
        wandb.define_metric(prefix, step_metric="train/step")


def close_monitors(engine) -> None:
    """Finish the W&B run (its files are complete afterwards; DeepSpeed never finishes it)."""
    if getattr(getattr(engine, "monitor", None), "wandb_monitor", None) is not None:
        import wandb

        wandb.finish()


def moe_param_groups(model: torch.nn.Module) -> list[dict]:
    """Dense parameters in one group, each expert-parallel group's experts in their own."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    dense = {"name": "dense", "params": [p for p in model.parameters() if p.requires_grad]}
    return split_params_into_different_moe_groups_for_optimizer(dense)


def _import_muon_uncompiled(ds_config: dict) -> None:
    """Import DeepSpeed's Muon optimizer with its ``torch.compile`` decorators left as no-ops,
    unless the JSON asks for Muon. Every ZeRO start imports it (``is_zero_supported_optimizer``
    adds it to the optimizers ZeRO accepts), and the decorators import Inductor, which nothing
    else here uses: 2.5 s of a 4-step 2-rank run of configs/tiny.yaml on 2 CPU cores (15.4 s ->
    12.9 s)."""
    optimizer = str((ds_config.get("optimizer") or {}).get("type", ""))
    if "muon" in optimizer.lower() or "TORCHDYNAMO_DISABLE" in os.environ:
        return
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by torch.compile when it decorates
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # a DeepSpeed without Muon: nothing to skip
        pass
    finally:
        del os.environ["TORCHDYNAMO_DISABLE"]


def build_engine(model: torch.nn.Module, ds_config: dict):
    """``deepspeed.initialize`` with MoE parameter groups; returns the engine (optimizer and
    scheduler live inside it, built from the JSON)."""
    import deepspeed

    _import_muon_uncompiled(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=moe_param_groups(model), config=ds_config
    )
    return engine
