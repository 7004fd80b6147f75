"""Pre-flight checks of an experiment before any rank starts: ``omni-ds check-config``.

Every problem is reported at once, each naming its key, its value and the fix:

* unknown keys in the YAML (from the typed config loader) or the DeepSpeed JSON, with a
  did-you-mean. The known top-level DeepSpeed keys are *recorded* from DeepSpeed's own parser
  (:func:`deepspeed_top_level_keys`), nested sections are checked by DeepSpeed's pydantic models;
* batch-size arithmetic: ``train_batch_size = micro × accumulation × data-parallel size``;
* ZeRO-3 together with MoE (DeepSpeed refuses it);
* ``ep_size`` not dividing the world size or the number of experts;
* precision conflicts (fp16 with bf16, fp16/bf16 with torch_autocast);
* ZeRO stage 0 + expert parallelism + gradient clipping: DeepSpeed's stage-0 clipping norm
  averages per-rank norms, so experts living on different ranks are mis-counted (DeepSpeed
  issue 8475); ZeRO-1/2 count every expert once (``tests/test_engine.py`` checks it);
* ZeRO-Offload with a torch optimizer but ``zero_force_ds_cpu_optimizer`` left on;
* a decaying LR schedule shorter than ``train.max_steps``;
* missing files (the DeepSpeed JSON, data and tokenizer paths);
* data readiness (``omni_ds.config.data_ready``): sources that name no shards or no usable
  sample, a tokenizer that does not cover the transcripts or exceeds ``model.vocab_size``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from pathlib import Path
from typing import Any

from omni_ds.config.data_ready import check_data
from omni_ds.config.experiment import ExperimentConfig, load_config
from omni_ds.config.model import MoEConfig


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else "remove it (DeepSpeed ignores it)"


@functools.lru_cache(maxsize=1)
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser looks up, recorded while it parses."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Keys(list):
        def __contains__(self, key):
            seen.add(key)
            return list.__contains__(self, key)

    class Recorder(dict):
        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(super().keys())

    DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1))
    # Read by DeepSpeedConfig only under an initialised process group (Ulysses).
    seen.add("sequence_parallel_size")
    return frozenset(k for k in seen if isinstance(k, str))


def _pydantic_model(name: str):
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _field_names(cls) -> list[str]:
    names = []
    for name, field in cls.model_fields.items():
        names.append(name)
        if field.alias:
            names.append(field.alias)
    return names


def _nested_model(cls, key: str):
    """The pydantic model class of field ``key`` of ``cls`` (through Optional/Union)."""
    import typing

    for name, field in cls.model_fields.items():
        if key in (name, field.alias):
            todo = [field.annotation]
            while todo:
                tp = todo.pop()
                if isinstance(tp, type) and hasattr(tp, "model_fields"):
                    return tp
                todo.extend(typing.get_args(tp))
    return None


def _section_of(ds: dict, first: str) -> str:
    if first in ds:
        return ""
    for key, value in ds.items():
        if isinstance(value, dict) and first in value:
            return key
    return ""


def check_deepspeed_json(ds: dict, where: str = "deepspeed") -> list[str]:
    """Problems DeepSpeed's own parser sees (unknown keys, bad values) plus unknown top-level keys."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    problems = []
    known = sorted(deepspeed_top_level_keys())
    for key in ds:
        if key not in known:
            problems.append(f"{where}: {key}: unknown DeepSpeed key; {_did_you_mean(key, known)}")
    # Batch sizes are checked against the real world size below, not DeepSpeed's default of 1.
    probe = {k: v for k, v in ds.items() if k in known and "batch" not in k}
    probe.pop("gradient_accumulation_steps", None)
    probe["train_micro_batch_size_per_gpu"] = 1
    if _enabled(probe, "fp16") and _enabled(probe, "bf16"):
        probe.pop("bf16")  # reported once, by check_precision
    # DeepSpeed stops at the first bad section; drop it and parse again to report every one.
    for _ in range(len(probe)):
        try:
            DeepSpeedConfig(probe)
            break
        except pydantic.ValidationError as e:
            model = _pydantic_model(e.title)
            for err in e.errors():
                loc = [str(p) for p in err["loc"]]
                section = _section_of(ds, loc[0]) if loc else ""
                problems.append(_describe(err, loc, section, model, where))
                probe.pop(section or (loc[0] if loc else ""), None)
        except (AssertionError, ValueError) as e:
            problems.append(f"{where}: DeepSpeed rejects the config: {e}")
            break
    return problems


def _describe(err: dict, loc: list[str], section: str, model, where: str) -> str:
    dotted = ".".join(([section] if section else []) + loc)
    if err["type"] == "extra_forbidden" and model is not None:
        cls = model
        for part in loc[:-1]:
            cls = _nested_model(cls, part) if cls is not None else None
        options = _field_names(cls) if cls is not None else []
        return f"{where}: {dotted}: unknown DeepSpeed key; {_did_you_mean(loc[-1], options)}"
    return f"{where}: {dotted}: {err.get('input')!r} is invalid: {err['msg']}; fix the value"


def _enabled(ds: dict, section: str) -> bool:
    value = ds.get(section)
    return isinstance(value, dict) and bool(value.get("enabled"))


def check_batch_sizes(ds: dict, world_size: int, where: str = "deepspeed") -> list[str]:
    total = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    if total is None and micro is None:
        return [
            f"{where}: train_micro_batch_size_per_gpu: missing; set it (omni-ds uses 1: one "
            "duration-bucketed loader batch per micro step) or train_batch_size"
        ]
    if total is not None and micro is not None and gas is not None:
        if total != micro * gas * world_size:
            return [
                f"{where}: train_batch_size: {total} != train_micro_batch_size_per_gpu ({micro}) "
                f"× gradient_accumulation_steps ({gas}) × data-parallel size ({world_size}) = "
                f"{micro * gas * world_size}; set train_batch_size to "
                f"{micro * gas * world_size} or remove it"
            ]
    elif total is not None:
        per_rank = micro if micro is not None else gas
        if total % (per_rank * world_size if per_rank else world_size):
            return [
                f"{where}: train_batch_size: {total} is not divisible by data-parallel size "
                f"({world_size}) × {'micro batch' if micro is not None else 'accumulation'} "
                f"({per_rank}); pick a multiple of {per_rank * world_size}"
            ]
    return []


def check_parallelism(
    ds: dict, moe: MoEConfig, world_size: int, where: str = "deepspeed"
) -> list[str]:
    problems = []
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    uses_moe = moe.router != "dense"
    if stage == 3 and uses_moe:
        problems.append(
            f"{where}: zero_optimization.stage: 3 with MoE (model.moe.router = {moe.router!r}); "
            "DeepSpeed refuses ZeRO-3 with its MoE layers; use stage 2 (experts are already "
            "sharded by ep_size) or router: dense"
        )
    if uses_moe and world_size % moe.ep_size:
        problems.append(
            f"model.moe.ep_size: {moe.ep_size} does not divide the world size ({world_size}); "
            f"use a divisor of {world_size} that also divides num_experts ({moe.num_experts})"
        )
    if uses_moe and moe.num_experts % moe.ep_size:
        problems.append(
            f"model.moe.ep_size: {moe.ep_size} does not divide model.moe.num_experts "
            f"({moe.num_experts}); use a divisor of {moe.num_experts}"
        )
    if stage == 0 and uses_moe and moe.ep_size > 1 and ds.get("gradient_clipping", 0) > 0:
        problems.append(
            f"{where}: zero_optimization.stage: 0 with ep_size {moe.ep_size} and "
            f"gradient_clipping {ds['gradient_clipping']}: DeepSpeed's stage-0 clipping norm "
            "mis-counts experts that live on different ranks (DeepSpeed issue 8475); use ZeRO "
            "stage 1 or 2, or gradient_clipping: 0"
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    torch_adam = ((ds.get("optimizer") or {}).get("params") or {}).get("torch_adam", False)
    if offload != "none" and torch_adam and ds.get("zero_force_ds_cpu_optimizer", True):
        problems.append(
            f"{where}: zero_force_ds_cpu_optimizer: {ds.get('zero_force_ds_cpu_optimizer', True)} "
            "with ZeRO-Offload and torch_adam: DeepSpeed refuses a torch optimizer for offload; "
            "set zero_force_ds_cpu_optimizer: false (or drop torch_adam to JIT-build CPU Adam)"
        )
    return problems


def check_precision(ds: dict, where: str = "deepspeed") -> list[str]:
    problems = []
    fp16, bf16 = _enabled(ds, "fp16"), _enabled(ds, "bf16") or _enabled(ds, "bfloat16")
    if fp16 and bf16:
        problems.append(
            f"{where}: fp16.enabled and bf16.enabled: both true; enable one of them (bf16 on "
            "GPUs that have it, fp16 with dynamic loss scaling otherwise)"
        )
    if (fp16 or bf16) and _enabled(ds, "torch_autocast"):
        problems.append(
            f"{where}: torch_autocast.enabled: true together with "
            f"{'fp16' if fp16 else 'bf16'}.enabled; use one way of lowering precision"
        )
    if fp16 and (ds.get("fp16") or {}).get("loss_scale", 0) not in (0, 0.0):
        problems.append(
            f"{where}: fp16.loss_scale: {ds['fp16']['loss_scale']} is a static scale; set it to "
            "0 for dynamic loss scaling (what omni-ds's non-finite-step accounting expects)"
        )
    return problems


def check_schedule(ds: dict, max_steps: int, where: str = "deepspeed") -> list[str]:
    params = (ds.get("scheduler") or {}).get("params") or {}
    total = params.get("total_num_steps")
    if total is not None and total < max_steps:
        return [
            f"{where}: scheduler.params.total_num_steps: {total} < train.max_steps "
            f"({max_steps}); the learning rate would reach its floor early; set it to {max_steps}"
        ]
    return []


def check_host(ds: dict, ds_path: Path) -> list[str]:
    """What this host cannot run (``omni-ds train`` checks it; ``check-config`` may run on
    another host than the job)."""
    import torch

    if _enabled(ds, "fp16") and not torch.cuda.is_available():
        return [
            f"deepspeed: fp16.enabled: true on a host without a GPU; DeepSpeed's CPU accelerator "
            f"refuses fp16; use ds_configs/zero1_fp32.json or zero2_bf16.json here "
            f"({ds_path} is for GPUs)"
        ]
    return []


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


def check_files(cfg: ExperimentConfig) -> list[str]:
    problems = []
    ds_path = Path(cfg.deepspeed)
    if not ds_path.is_file():
        problems.append(
            f"deepspeed: {str(ds_path)!r} does not exist; name a JSON such as "
            "ds_configs/zero2_bf16.json"
        )
    for key, path in _paths_in(cfg.data, "data"):
        if "*" not in str(path) and "{" not in str(path) and not path.exists():
            problems.append(f"{key}: {str(path)!r} does not exist; check the path")
    return problems


def read_ds_config(path: str | Path) -> dict:
    """The DeepSpeed JSON as a dict (strict JSON; DeepSpeed itself would also take HJSON)."""
    return json.loads(Path(path).read_text())


def check_experiment(
    config: str | Path, overrides: list[str] | tuple[str, ...] = (), world_size: int = 1
) -> tuple[ExperimentConfig | None, dict | None, list[str]]:
    """Load and check an experiment; returns (config or None, DeepSpeed dict or None, problems)."""
    try:
        cfg = load_config(config, overrides)
    except ValueError as e:  # ConfigError, or data_pipeline's plain ValueError
        return None, None, [str(e)]
    problems = check_files(cfg) + check_data(cfg)
    ds = None
    if Path(cfg.deepspeed).is_file():
        try:
            ds = read_ds_config(cfg.deepspeed)
        except json.JSONDecodeError as e:
            problems.append(f"deepspeed: {str(cfg.deepspeed)!r} is not valid JSON: {e}")
    if ds is not None:
        problems += check_deepspeed_json(ds)
        problems += check_batch_sizes(ds, world_size)
        problems += check_precision(ds)
        problems += check_parallelism(ds, cfg.model.moe, world_size)
        problems += check_schedule(ds, cfg.train.max_steps)
    return cfg, ds, problems
