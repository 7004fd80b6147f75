"""Checkpoint → model directory: consolidate the shards, check them against the model, save.

    model_dir = export_checkpoint("runs/omni", "models/omni")

The run's resolved ``config.yaml`` is found next to ``checkpoints/`` (or given), the model is
rebuilt from it with ``ep_size=1`` and the consolidated weights must load into it strictly before
anything is written, so a model directory never holds weights its config cannot run. Only the
model's part of the config is exported (``config.json``); the run's seed and a ``recipe`` hash go
into the weights' metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omni_ds.ckpt.consolidate import consolidate
from omni_ds.ckpt.model_dir import inference_model_config, load_state_dict_tied, save_model_dir
from omni_ds.config.experiment import ExperimentConfig, load_config
from omni_ds.config.loading import to_dict
from omni_ds.model import build_model


def find_run_config(tag_dir: Path) -> Path:
    """``RUN_DIR/config.yaml`` for ``RUN_DIR/checkpoints/<tag>``."""
    for candidate in (tag_dir.parent.parent / "config.yaml", tag_dir.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no config.yaml found for checkpoint {tag_dir} (looked in the run dir two levels up); "
        "pass --config RUN_DIR/config.yaml"
    )


def recipe_hash(config: ExperimentConfig, global_steps: int) -> str:
    """What the run trained, without its seed and paths: model, data settings, training length,
    the DeepSpeed JSON's content, and the checkpoint's step. Checkpoints of one step of runs that
    differ only in ``train.seed`` share it."""
    plain = to_dict(config)
    plain["global_steps"] = global_steps
    for key in ("seed", "run_dir"):
        plain["train"].pop(key, None)
    for key in ("train", "dev", "tokenizer"):
        plain["data"].pop(key, None)
    plain.pop("checkpoint", None)
    plain["model"]["moe"].pop("ep_size", None)  # a layout, not a recipe
    ds = Path(plain.pop("deepspeed"))
    plain["deepspeed_json"] = json.loads(ds.read_text()) if ds.is_file() else str(ds)
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    config_path: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write ``out/`` (see :mod:`omni_ds.ckpt.model_dir`) from a run dir, checkpoints dir or tag."""
    merged = consolidate(checkpoint)
    config = load_config(config_path or find_run_config(merged.tag_dir))
    model = build_model(inference_model_config(config.model))
    load_state_dict_tied(model, merged.state_dict, merged.shared)
    return save_model_dir(
        out,
        merged.unique_state_dict(),
        merged.shared,
        config.model,
        tokenizer or config.data.tokenizer,
        metadata={
            "source": str(merged.tag_dir),
            "global_steps": str(merged.global_steps),
            "fp32_masters": str(merged.fp32_masters).lower(),
            "seed": str(config.train.seed),
            "recipe": recipe_hash(config, merged.global_steps),
        },
    )
