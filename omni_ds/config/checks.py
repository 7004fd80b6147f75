"""The pre-launch checks: ONE function, :func:`preflight`, run by ``omni-ds check-config``,
``omni-ds train`` (before any rank builds anything) and ``omni-ds submit``.

:func:`preflight` loads the experiment (a path or a shipped preset name), reads its DeepSpeed JSON
as DeepSpeed reads it, resolves ``"auto"`` values (``omni_ds.config.ds_json``), and runs every
function of :data:`CHECKS` on the resulting :class:`Plan`. Every problem is reported at once,
each naming its key, its value and the fix:

* unknown keys in the YAML (the typed config loader) or the DeepSpeed JSON, with a did-you-mean,
  and values DeepSpeed's own models reject (``omni_ds.config.ds_schema``);
* ``"auto"`` values nothing in the experiment determines; batch keys read as omni-ds trains
  (one micro batch = one loader batch); sections that would do nothing;
* batch-size arithmetic: ``train_batch_size = micro × accumulation × data-parallel size``;
* ZeRO-3 together with MoE (DeepSpeed refuses it);
* ``model.moe.ep_size`` not dividing the world size or the number of experts;
* precision conflicts (fp16 with bf16, fp16/bf16 with torch_autocast), fp16 without a GPU;
* learning rates, betas, eps and weight decay PyTorch would refuse once every rank has started;
* ZeRO stage 0 + expert parallelism + gradient clipping: DeepSpeed's stage-0 clipping norm
  averages per-rank norms, so experts living on different ranks are mis-counted (DeepSpeed
  issue 8475); ZeRO-1/2 count every expert once (``tests/test_engine.py`` checks it);
* ZeRO-Offload with a torch optimizer but ``zero_force_ds_cpu_optimizer`` left on;
* a decaying LR schedule shorter than ``train.max_steps``;
* monitors whose package is not installed;
* missing files (the DeepSpeed JSON, data and tokenizer paths);
* data readiness (``omni_ds.config.data_ready``): sources that name no shards or no usable
  sample, a tokenizer that does not cover the transcripts or exceeds ``model.vocab_size``.

A new check is a function ``(plan) -> list[str]`` appended to :data:`CHECKS`; it may also append
to ``plan.warnings`` (printed, not fatal).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omni_ds.config import presets
from omni_ds.config.data_ready import check_data
from omni_ds.config.ds_json import (
    check_batch_keys,
    check_inert_sections,
    read_ds_config,
    resolve_auto,
)
from omni_ds.config.ds_schema import check_deepspeed_json
from omni_ds.config.experiment import ExperimentConfig, load_config


@dataclasses.dataclass
class Plan:
    """What a launch would run: the experiment, its resolved DeepSpeed dict, how many processes
    and on what device."""

    cfg: ExperimentConfig
    ds: dict | None
    """The DeepSpeed JSON with ``"auto"`` resolved; None when it is missing or unreadable."""
    world_size: int
    device: str
    """``cuda`` or ``cpu``: where the ranks will run."""
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Preflight:
    """The outcome of :func:`preflight`."""

    cfg: ExperimentConfig | None
    ds: dict | None
    problems: list[str]
    warnings: list[str]


_TRUE_STRINGS = ("1", "on", "t", "true", "y", "yes")
"""The strings DeepSpeed's (pydantic) config reads as true; "auto" is none of them: an unresolved
"auto" is reported by its own check, not taken as enabled."""


def _enabled(ds: dict, section: str) -> bool:
    value = ds.get(section)
    enabled = value.get("enabled") if isinstance(value, dict) else None
    if isinstance(enabled, str):
        return enabled.strip().lower() in _TRUE_STRINGS
    return bool(enabled)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_files(plan: Plan) -> list[str]:
    problems = []
    ds_path = Path(plan.cfg.deepspeed)
    if not ds_path.is_file():
        problems.append(
            f"deepspeed: {str(ds_path)!r} does not exist; name a JSON file or a shipped one "
            f"({', '.join(presets.names('ds_configs'))})"
        )
    for key, path in _paths_in(plan.cfg.data, "data"):
        if "*" not in str(path) and "{" not in str(path) and not path.exists():
            problems.append(f"{key}: {str(path)!r} does not exist; check the path")
    return problems


def _paths_in(obj: Any, where: str):
    """(dotted key, path) of every Path-typed field value in a config dataclass tree."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{where}.{field.name}"
        if dataclasses.is_dataclass(value):
            yield from _paths_in(value, key)
        elif isinstance(value, Path):
            yield key, value
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, Path):
                    yield f"{key}[{i}]", item
        elif isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, Path):
                    yield f"{key}.{name}", item


def check_deepspeed_keys(plan: Plan) -> list[str]:
    if plan.ds is None:
        return []
    return check_deepspeed_json(plan.ds) + check_inert_sections(plan.ds)


def check_batch_sizes(plan: Plan) -> list[str]:
    if plan.ds is None:
        return []
    ds, world_size = plan.ds, plan.world_size
    total = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    if total is None and micro is None:
        return [
            "deepspeed: train_micro_batch_size_per_gpu: missing; set it to 1 (omni-ds trains "
            "one duration-bucketed loader batch per micro step) or set train_batch_size"
        ]
    if total is not None and micro is not None and gas is not None:
        if total != micro * gas * world_size:
            return [
                f"deepspeed: train_batch_size: {total} != train_micro_batch_size_per_gpu "
                f"({micro}) × gradient_accumulation_steps ({gas}) × data-parallel size "
                f"({world_size}) = {micro * gas * world_size}; set train_batch_size to "
                f"{micro * gas * world_size} or remove it"
            ]
    elif total is not None:
        per_rank = micro if micro is not None else gas
        if total % (per_rank * world_size if per_rank else world_size):
            return [
                f"deepspeed: train_batch_size: {total} is not divisible by data-parallel size "
                f"({world_size}) × {'micro batch' if micro is not None else 'accumulation'} "
                f"({per_rank}); pick a multiple of {per_rank * world_size}"
            ]
    problems, warnings = check_batch_keys(ds, world_size, plan.cfg.data.max_batch_seconds)
    plan.warnings += warnings
    return problems


def check_parallelism(plan: Plan) -> list[str]:
    ds, moe, world_size = plan.ds or {}, plan.cfg.model.moe, plan.world_size
    problems = []
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    uses_moe = moe.router != "dense"
    if stage == 3 and uses_moe:
        problems.append(
            f"deepspeed: zero_optimization.stage: 3 with MoE (model.moe.router = "
            f"{moe.router!r}); DeepSpeed refuses ZeRO-3 with its MoE layers; use stage 2 "
            "(experts are already sharded by ep_size) or router: dense"
        )
    if uses_moe and world_size % moe.ep_size:
        problems.append(
            f"model.moe.ep_size: {moe.ep_size} does not divide the world size ({world_size}); "
            f"use a divisor of {world_size} that also divides num_experts ({moe.num_experts})"
        )
    clipping = ds.get("gradient_clipping", 0)
    if stage == 0 and uses_moe and moe.ep_size > 1 and _number(clipping) and clipping > 0:
        problems.append(
            f"deepspeed: zero_optimization.stage: 0 with model.moe.ep_size {moe.ep_size} and "
            f"gradient_clipping {clipping}: DeepSpeed's stage-0 clipping norm mis-counts "
            "experts that live on different ranks (DeepSpeed issue 8475); use ZeRO stage 1 or "
            "2, or gradient_clipping: 0"
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    torch_adam = ((ds.get("optimizer") or {}).get("params") or {}).get("torch_adam", False)
    force = ds.get("zero_force_ds_cpu_optimizer", True)
    if offload != "none" and torch_adam and force:
        problems.append(
            f"deepspeed: zero_force_ds_cpu_optimizer: {force} with ZeRO-Offload and "
            "torch_adam: DeepSpeed refuses a torch optimizer for offload; set "
            "zero_force_ds_cpu_optimizer: false (or drop torch_adam to JIT-build CPU Adam)"
        )
    return problems


def check_precision(plan: Plan) -> list[str]:
    ds = plan.ds or {}
    problems = []
    fp16, bf16 = _enabled(ds, "fp16"), _enabled(ds, "bf16") or _enabled(ds, "bfloat16")
    if fp16 and bf16:
        problems.append(
            "deepspeed: fp16.enabled and bf16.enabled: both true; enable one of them (bf16 on "
            "GPUs that have it, fp16 with dynamic loss scaling otherwise)"
        )
    if (fp16 or bf16) and _enabled(ds, "torch_autocast"):
        problems.append(
            f"deepspeed: torch_autocast.enabled: true together with "
            f"{'fp16' if fp16 else 'bf16'}.enabled; use one way of lowering precision"
        )
    if fp16 and (ds.get("fp16") or {}).get("loss_scale", 0) not in (0, 0.0):
        problems.append(
            f"deepspeed: fp16.loss_scale: {ds['fp16']['loss_scale']} is a static scale; set it "
            "to 0 for dynamic loss scaling (what omni-ds's non-finite-step accounting expects)"
        )
    if fp16 and plan.device == "cpu":
        problems.append(
            "deepspeed: fp16.enabled: true for ranks without a GPU; DeepSpeed's CPU accelerator "
            "refuses fp16; use ds_configs/zero1_fp32.json or zero2_bf16.json on CPUs (check-config "
            "--device cuda checks a GPU job from a host without one)"
        )
    return problems


def check_optimizer(plan: Plan) -> list[str]:
    """Values PyTorch's optimizer or DeepSpeed's scheduler refuse only after every rank started."""
    ds = plan.ds or {}
    problems = []
    for section in ("optimizer", "scheduler"):
        for key, value in ((ds.get(section) or {}).get("params") or {}).items():
            where = f"deepspeed: {section}.params.{key}"
            if "lr" in key.split("_") and _number(value) and value < 0:
                problems.append(
                    f"{where}: {value} is negative; PyTorch refuses it ('Invalid learning rate') "
                    "after every rank has started; use a positive rate, e.g. 1e-3"
                )
            elif section == "optimizer" and key in ("eps", "weight_decay") and _number(value):
                if value < 0:
                    problems.append(f"{where}: {value} is negative; use 0 or more")
            elif section == "optimizer" and key == "betas" and isinstance(value, list):
                if len(value) != 2 or not all(_number(b) and 0 <= b < 1 for b in value):
                    problems.append(
                        f"{where}: {value} must be two numbers in [0, 1); use e.g. [0.9, 0.98]"
                    )
    return problems


def check_schedule(plan: Plan) -> list[str]:
    params = ((plan.ds or {}).get("scheduler") or {}).get("params") or {}
    total, max_steps = params.get("total_num_steps"), plan.cfg.train.max_steps
    if _number(total) and total < max_steps:
        return [
            f"deepspeed: scheduler.params.total_num_steps: {total} < train.max_steps "
            f"({max_steps}); the learning rate would reach its floor early; set it to "
            f'{max_steps} (or "auto")'
        ]
    return []


# section -> (module to import, omni-ds extra that installs it)
MONITOR_PACKAGES = {"wandb": ("wandb", "wandb"), "comet": ("comet_ml", "comet")}


def check_monitors(plan: Plan) -> list[str]:
    return [
        f"deepspeed: {section}.enabled: true but the {module} package is not installed; "
        f"pip install 'omni-ds[{extra}]' (or disable the section)"
        for section, (module, extra) in MONITOR_PACKAGES.items()
        if _enabled(plan.ds or {}, section) and importlib.util.find_spec(module) is None
    ]


def check_data_ready(plan: Plan) -> list[str]:
    return check_data(plan.cfg)


CHECKS: list[Callable[[Plan], list[str]]] = [
    check_files,
    check_data_ready,
    check_deepspeed_keys,
    check_batch_sizes,
    check_precision,
    check_optimizer,
    check_parallelism,
    check_schedule,
    check_monitors,
]
"""Every check :func:`preflight` runs, in order."""


def this_host_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def preflight(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int = 1,
    device: str | None = None,
) -> Preflight:
    """Load and check an experiment for ``world_size`` ranks on ``device`` (default: this host's).

    ``config`` is a YAML path or a shipped preset name (``omni_8x84m``); the experiment's
    ``deepspeed:`` may likewise name a shipped JSON. Returns the config, the resolved DeepSpeed
    dict to train with, and every problem and warning.
    """
    path = presets.find(config, "configs")
    if not path.is_file():
        return Preflight(None, None, [
            f"config: {str(config)!r} is neither a file nor a shipped preset; give a YAML path or "
            f"one of {', '.join(presets.names('configs'))}"], [])  # fmt: skip
    try:
        cfg = load_config(path, overrides)
    except ValueError as e:  # ConfigError, or data_pipeline's plain ValueError
        return Preflight(None, None, [str(e)], [])
    cfg = dataclasses.replace(cfg, deepspeed=presets.find(cfg.deepspeed, "ds_configs"))
    problems: list[str] = []
    ds = None
    if Path(cfg.deepspeed).is_file():
        try:
            ds = read_ds_config(cfg.deepspeed)
        except ValueError as e:
            problems.append(str(e))
    if ds is not None:
        problems += resolve_auto(ds, max_steps=cfg.train.max_steps, d_model=cfg.model.d_model,
                                 world_size=world_size)  # fmt: skip
    plan = Plan(cfg, ds, world_size, device or this_host_device())
    for check in CHECKS:
        problems += check(plan)
    return Preflight(cfg, ds, problems, plan.warnings)
