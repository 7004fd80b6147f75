"""A self-contained model directory: what ``omni-ds export`` writes and inference loads.

    MODEL_DIR/model.safetensors   fp32 weights; tied tensors (the Omni router) stored once
    MODEL_DIR/config.json         the model only: architecture, tokenizer, sample rate, version
    MODEL_DIR/tokenizer.model     the SentencePiece model that maps token ids to text

``config.json``: ``format`` (``omni-ds-model``), ``omni_ds_version`` (of the export), ``model``
(the architecture: every key of ``ModelConfig``, ``moe.ep_size`` = 1), ``tokenizer`` (file,
kind, vocabulary size) and ``sample_rate`` (Hz of the audio the front end expects). Nothing about
the training run (data paths, run dir, DeepSpeed JSON) is kept; its provenance is in the weights'
metadata.

``model.safetensors`` metadata: ``format`` = ``omni-ds``, ``tied`` (JSON: alias key -> stored
key, e.g. every MoE layer's gate weight -> ``router.*``), ``source`` (the checkpoint),
``global_steps``, ``fp32_masters`` (``true`` when the weights are DeepSpeed's fp32 values),
``seed`` (``train.seed``) and ``recipe`` (a hash of the training setup without seed and paths;
``omni-ds eval`` groups the seeds of one recipe by it). The tensor names are documented in
``docs/evaluation.md`` ("Tensor names").

:func:`load_model_dir` rebuilds the encoder with ``ep_size=1`` (one process holds every expert),
loads the weights strictly (every key but the tied aliases must be present, nothing extra), and
puts it in eval mode. A directory exported before ``config.json`` existed (``config.yaml``, the
whole experiment) loads through that file's ``model`` section.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from data_pipeline.audio import SAMPLE_RATE
from omni_ds.config.loading import from_dict, to_dict
from omni_ds.config.model import ModelConfig
from omni_ds.model import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LEGACY_CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
FORMAT = "omni-ds-model"


@dataclasses.dataclass(kw_only=True)
class ModelDirConfig:
    """``config.json`` of a model directory."""

    model: ModelConfig
    """The architecture, with every expert in one process (``moe.ep_size`` = 1)."""
    sample_rate: int = SAMPLE_RATE
    """Sample rate (Hz) of the audio the front end was trained on; inputs are resampled to it."""
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``file`` (next to config.json), ``kind`` (``sentencepiece``), ``vocab_size``."""
    omni_ds_version: str = ""
    """The omni-ds version that exported the model."""
    format: str = FORMAT

    def to_dict(self) -> dict:
        return {"format": self.format, "omni_ds_version": self.omni_ds_version,
                "model": to_dict(self.model), "tokenizer": self.tokenizer,
                "sample_rate": self.sample_rate}  # fmt: skip


def read_config(model_dir: Path) -> ModelDirConfig:
    path = model_dir / CONFIG
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return from_dict(ModelDirConfig, data, where=str(path))
    legacy = yaml.safe_load((model_dir / LEGACY_CONFIG).read_text())
    return ModelDirConfig(model=from_dict(ModelConfig, legacy["model"], where="model"))


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    """The encoder (``SpeechEncoder``) in eval mode, ``ep_size=1``."""
    config: ModelDirConfig
    """``config.json``: ``config.model`` is the architecture."""
    model_dir: Path
    metadata: dict[str, str]

    @functools.cached_property
    def tokenizer(self):
        """``data_pipeline.tokenizer.Tokenizer`` of ``tokenizer.model`` (loaded on first use)."""
        from data_pipeline.tokenizer import Tokenizer

        return Tokenizer(str(self.model_dir / TOKENIZER))


def save_model_dir(
    out: str | Path,
    state_dict: dict[str, torch.Tensor],
    tied: dict[str, str],
    model_config: ModelConfig,
    tokenizer_model: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the three files; ``state_dict`` holds each tied tensor once (under ``tied``'s values)."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    import omni_ds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    missing = sorted(set(tied.values()) - set(state_dict))
    if missing or set(tied) & set(state_dict):
        raise ValueError(f"tied keys must be stored once under their canonical name; got {missing}")
    tensors = {
        k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in state_dict.items()
    }
    meta = {"format": "omni-ds", "tied": json.dumps(tied, sort_keys=True), **(metadata or {})}
    save_file(tensors, str(out / WEIGHTS), metadata=meta)
    pieces = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    config = ModelDirConfig(
        model=inference_model_config(model_config),
        tokenizer={"file": TOKENIZER, "kind": "sentencepiece", "vocab_size": pieces},
        omni_ds_version=omni_ds.__version__,
    )
    (out / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (out / LEGACY_CONFIG).unlink(missing_ok=True)  # a re-export over an older directory
    shutil.copyfile(tokenizer_model, out / TOKENIZER)
    return out


def read_weights(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of ``model.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_metadata(model_dir: str | Path) -> dict[str, str]:
    """The metadata of ``model.safetensors`` alone (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / WEIGHTS), framework="pt") as f:
        return dict(f.metadata() or {})


def inference_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config with every expert in one process (``moe.ep_size = 1``)."""
    return dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, ep_size=1))


def load_state_dict_tied(model: torch.nn.Module, tensors: dict, tied: dict[str, str]) -> None:
    """Strict loading, except that tied aliases may be absent (they share the stored tensor)."""
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - set(tied)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit the model built from its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    state = model.state_dict()
    for alias, canonical in tied.items():
        if alias in state and state[alias].data_ptr() != state[canonical].data_ptr():
            raise ValueError(
                f"{alias} should share {canonical}'s tensor in this model but does not"
            )


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The encoder, config and tokenizer of an exported model directory."""
    model_dir = Path(model_dir)
    legacy = not (model_dir / CONFIG).is_file() and (model_dir / LEGACY_CONFIG).is_file()
    config_name = LEGACY_CONFIG if legacy else CONFIG
    for name in (WEIGHTS, config_name, TOKENIZER):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir / name} is missing; MODEL_DIR must be written by omni-ds export"
            )
    config = read_config(model_dir)
    model = build_model(inference_model_config(config.model))
    tensors, metadata = read_weights(model_dir)
    load_state_dict_tied(model, tensors, json.loads(metadata.get("tied", "{}")))
    model.to(device).eval()
    return LoadedModel(model, config, model_dir, metadata)
