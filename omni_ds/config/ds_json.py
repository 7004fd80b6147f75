"""The DeepSpeed JSON as DeepSpeed reads it, and what its keys mean in omni-ds.

* Read with ``hjson`` (comments, trailing commas, unquoted keys), as ``deepspeed.initialize``
  reads a config file, refusing duplicate keys as it does.
* ``"auto"`` values (the Hugging Face Trainer integration's convention) are resolved the way that
  integration resolves them wherever the value follows from the experiment: the batch keys, the
  gradient-clipping default (1.0), the scheduler's ``total_num_steps`` (``train.max_steps``),
  ``warmup_min_lr`` (0) and ``warmup_max_lr`` (the optimizer's lr), and the ZeRO bucket sizes
  from ``model.d_model``. Every other ``"auto"`` is refused naming its key, because nothing in an
  experiment says what it should be (the HF Trainer takes those from its command-line arguments).
* Batch keys: one DeepSpeed micro batch is one duration-bucketed loader batch (up to
  ``data.max_batch_seconds`` of audio), so ``train_micro_batch_size_per_gpu`` must be 1 and
  ``train_batch_size`` counts loader batches over all ranks, not utterances.
* Sections omni-ds never exercises (activation checkpointing, DeepSpeed's data pipeline, ...)
  are refused instead of being accepted and doing nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# "auto" values DeepSpeed itself understands (its own defaults), left for it to resolve.
DEEPSPEED_AUTO = ("pipeline.stages", "replace_method", "keep_in_fp32_modules")

# Sections DeepSpeed accepts but that act only through hooks omni-ds does not use.
INERT = {
    "activation_checkpointing": "configures deepspeed.checkpointing.checkpoint(), which the "
    "omni-ds encoder never calls, so no activation is recomputed and no memory is saved",
    "data_efficiency": "drives DeepSpeed's curriculum sampler and random-LTD, which act only "
    "through DeepSpeed's own data loader and layer hooks; omni-ds has its own duration-bucketed "
    "loader (data.*)",
    "curriculum_learning": "drives DeepSpeed's curriculum scheduler, which acts only through "
    "DeepSpeed's own data loader; omni-ds has its own duration-bucketed loader (data.*)",
    "progressive_layer_drop": "needs a model whose forward takes DeepSpeed's layer-drop "
    "arguments; the omni-ds encoder does not",
    "dataloader_drop_last": "applies to deepspeed.initialize's training_data loader, which "
    "omni-ds does not use",
    "sparse_attention": "configures DeepSpeed's sparse-attention kernels, which the omni-ds "
    "encoder does not use",
    "compression_training": "takes effect only after deepspeed.compression.init_compression(), "
    "which omni-ds never calls",
}


def read_ds_config(path: str | Path) -> dict:
    """The DeepSpeed config file as DeepSpeed reads it (HJSON; duplicate keys refused).

    Raises ``ValueError`` naming the file, line and column of a syntax error.
    """
    import hjson
    from deepspeed.runtime.config import dict_raise_error_on_duplicate_keys

    text = Path(path).read_text()
    try:
        data = hjson.loads(text, object_pairs_hook=dict_raise_error_on_duplicate_keys)
    except hjson.HjsonDecodeError as e:
        raise ValueError(f"deepspeed: {str(path)!r} is neither JSON nor HJSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed: {str(path)!r} must hold a mapping of DeepSpeed keys")
    return _plain(data)


def _plain(value: Any) -> Any:
    """hjson's ordered dicts and lists as plain ones (what ``deepspeed.initialize`` is given)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _autos(node: Any, where: str = ""):
    """Dotted keys of every ``"auto"`` value under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _autos(value, f"{where}.{key}" if where else str(key))
    elif node == "auto":
        yield where


def _node(ds: dict, dotted: str) -> tuple[dict | None, str]:
    """The mapping holding ``dotted``'s last key, and that key."""
    *parents, key = dotted.split(".")
    node: Any = ds
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), key


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def resolve_auto(ds: dict, *, max_steps: int, d_model: int, world_size: int) -> list[str]:
    """Replace the ``"auto"`` values of ``ds`` (in place) that follow from the experiment, as the
    Hugging Face integration does; returns one problem per ``"auto"`` that does not."""

    def fill(dotted: str, value: Any) -> None:
        node, key = _node(ds, dotted)
        if node is not None and node.get(key) == "auto":
            node[key] = value

    fill("train_micro_batch_size_per_gpu", 1)  # one loader batch per micro step
    micro = ds.get("train_micro_batch_size_per_gpu", 1)
    if ds.get("gradient_accumulation_steps") == "auto":
        total = ds.get("train_batch_size")
        per_step = micro * world_size if _number(micro) else 0
        if _number(total) and per_step and total % per_step == 0:
            ds["gradient_accumulation_steps"] = max(total // per_step, 1)
        else:
            ds["gradient_accumulation_steps"] = 1  # the HF Trainer's default
    gas = ds.get("gradient_accumulation_steps", 1)
    if _number(micro) and _number(gas):
        fill("train_batch_size", micro * gas * world_size)
    fill("gradient_clipping", 1.0)  # the HF Trainer's max_grad_norm default
    fill("scheduler.params.total_num_steps", max_steps)
    fill("scheduler.params.warmup_min_lr", 0.0)
    lr = ((ds.get("optimizer") or {}).get("params") or {}).get("lr")
    if _number(lr):
        fill("scheduler.params.warmup_max_lr", lr)
    # The HF integration's hidden-size rules, with d_model as the hidden size.
    fill("zero_optimization.reduce_bucket_size", d_model * d_model)
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * d_model * d_model))
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * d_model)
    return [
        f'deepspeed: {key}: "auto" cannot be resolved from the experiment (the Hugging Face '
        f"Trainer fills it from its own arguments, omni-ds has none for it); {_auto_fix(key)}"
        for key in _autos(ds)
        if not any(key == k or key.endswith(f".{k}") for k in DEEPSPEED_AUTO)
    ]


def _auto_fix(key: str) -> str:
    fixes = {
        "optimizer.params.lr": "set the learning rate, e.g. 1e-3",
        "optimizer.params.betas": "set them, e.g. [0.9, 0.98]",
        "optimizer.params.eps": "set it, e.g. 1e-8",
        "optimizer.params.weight_decay": "set it, e.g. 0.01",
        "scheduler.params.warmup_max_lr": "set it to the peak learning rate, e.g. 1e-3",
        "scheduler.params.warmup_num_steps": "set the number of warm-up steps, e.g. 1000",
        "fp16.enabled": "set true or false",
        "bf16.enabled": "set true or false",
    }
    return fixes.get(key, "set a value")


def check_batch_keys(ds: dict, world_size: int, max_batch_seconds: float) -> tuple[list, list]:
    """(problems, warnings) of the batch keys read as omni-ds trains: one micro batch is one
    loader batch of up to ``max_batch_seconds`` of audio."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    total = ds.get("train_batch_size")
    gas = ds.get("gradient_accumulation_steps")
    batch = f"data.max_batch_seconds ({max_batch_seconds:g} s of audio)"
    derived = micro is None and _number(total) and _number(gas) and total % (gas * world_size) == 0
    if derived and total // (gas * world_size) != 1:
        micro = total // (gas * world_size)
        return [
            f"deepspeed: train_batch_size: {total} with gradient_accumulation_steps {gas} at "
            f"world size {world_size} makes DeepSpeed's micro batch {total} / ({gas} × "
            f"{world_size}) = {micro}, which is not an utterance count in omni-ds: one micro "
            f"batch is one duration-bucketed loader batch of up to {batch}, however many "
            f"utterances fit, and each step accumulates {gas} of them per rank whatever "
            f"train_batch_size says; set train_batch_size: {gas * world_size} (or remove it) "
            "and size batches with data.max_batch_seconds"
        ], []
    if _number(micro) and micro != 1:
        if _number(total) and gas is None and total % (micro * world_size) == 0:
            steps = total // (micro * world_size)
            effect = (
                f"with train_batch_size {total} at world size {world_size} DeepSpeed would "
                f"accumulate {total} / ({micro} × {world_size}) = {steps} loader batches per "
                f"step and the {micro} would change nothing else; to keep that set "
                f"gradient_accumulation_steps: {steps}"
            )
        else:
            effect = "it would only change DeepSpeed's accumulation arithmetic"
        return [
            f"deepspeed: train_micro_batch_size_per_gpu: {micro} is not an utterance count in "
            f"omni-ds: one micro batch is one duration-bucketed loader batch of up to {batch}, "
            f"however many utterances fit; {effect}; set train_micro_batch_size_per_gpu: 1 and "
            "size batches with data.max_batch_seconds"
        ], []
    if _number(total) and gas is None and total % world_size == 0:
        return [], [
            f"deepspeed: train_batch_size: {total} counts loader batches, not utterances: at "
            f"world size {world_size} each optimizer step accumulates {total} / {world_size} = "
            f"{total // world_size} loader batches of up to {batch} per rank; set "
            "gradient_accumulation_steps instead to say so directly"
        ]
    return [], []


def check_inert_sections(ds: dict) -> list[str]:
    """Sections that DeepSpeed accepts but that would do nothing in omni-ds."""
    problems = []
    for key, meaning in INERT.items():
        value = ds.get(key)
        if value is None or value is False:
            continue
        if isinstance(value, dict) and value.get("enabled") is False:
            continue
        problems.append(
            f'deepspeed: {key}: this section {meaning}; remove it (or set "enabled": false)'
        )
    return problems
