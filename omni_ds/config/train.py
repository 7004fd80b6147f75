"""The ``train:`` and ``checkpoint:`` sections of an experiment YAML (what omni-ds owns).

DeepSpeed owns batch sizes, optimizer, scheduler, ZeRO stage, precision, clipping and monitors:
those stay in the JSON named by the experiment's ``deepspeed:`` key (see ``ds_configs/``). These
dataclasses hold the rest: how long to train, where the run lives, when to checkpoint and resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omni_ds.errors import ConfigError


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: Path = Path("runs/default")
    """Everything of one run: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``,
    ``tensorboard/``. Relative paths are taken from the working directory."""
    max_steps: int = 1000
    """Optimizer steps to train for (one step = ``gradient_accumulation_steps`` loader batches)."""
    seed: int = 0
    """Seeds python, numpy and torch on every rank (offset by rank) and the data order."""
    log_every: int = 10
    """Write a metrics line (losses, lr, grad norm, routing, throughput) every N steps."""
    dev_every: int = 0
    """Dev loss and WER every N steps; 0 = only at the end (if the data config has dev sets)."""
    dev_max_batches: int = 0
    """Cap on dev batches per evaluation; 0 = the whole dev set."""
    max_nonfinite_in_a_row: int = 5
    """A non-finite loss skips its batch; this many in a row stops the run with an error."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for the MFU estimate; 0 = look it up from the GPU name
    (measured with a matmul on CPUs)."""
    progress_bar: bool = True
    """A tqdm bar on rank 0 when its stderr is a terminal; otherwise (a SLURM log, a pipe) or
    when false, one plain line per logged step and per dev evaluation."""
    log_samples: bool = False
    """Also write each step's utterance keys per rank to ``samples/rank<R>.jsonl``: an audit
    of the data order (which utterances every step trained on, across resumes)."""
    routing_trace_every: int = 0
    """Every N steps each rank appends the per-layer expert choices of the step's first
    ``routing_trace_frames`` real frames (plus each layer's expert load and selection bias) to
    ``routing_trace/rank<R>.jsonl``; ``omni-ds analyze --trace RUN_DIR`` plots it. 0 = off."""
    routing_trace_frames: int = 256
    """Real frames per trace record and rank (bounds each record to frames x MoE layers ids)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"train.{key}: {getattr(self, key)} must be at least 1; set it to 1 or more"
                )
        if self.routing_trace_frames < 1:
            raise ConfigError(
                f"train.routing_trace_frames: {self.routing_trace_frames} must be at least 1"
            )
        for key in ("dev_every", "dev_max_batches", "routing_trace_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: {getattr(self, key)} must be 0 (off) or positive")
        if self.max_nonfinite_in_a_row < 1:
            raise ConfigError(
                f"train.max_nonfinite_in_a_row: {self.max_nonfinite_in_a_row} must be at least 1"
            )
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops: {self.peak_tflops} must be 0 (auto) or positive")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500
    """Save every N optimizer steps; 0 = not by step count."""
    every_minutes: float = 0.0
    """Save when this many minutes passed since the last save (rank 0's clock decides for all);
    0 = not by time."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """``auto``: continue from the latest complete checkpoint in the run dir, if any; ``none``:
    start fresh (refused when the run dir already has checkpoints); or a checkpoint directory
    (``RUN/checkpoints/step_N``) to start from."""
    save_final: bool = True
    """Save after the last step."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0:
            raise ConfigError(
                "checkpoint.every_steps / every_minutes: must be 0 (off) or positive, got "
                f"{self.every_steps} / {self.every_minutes}"
            )
        if self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last: {self.keep_last} must be at least 1; a run must keep "
                "its latest checkpoint"
            )
        if not self.resume:
            raise ConfigError("checkpoint.resume: empty; use auto, none, or a checkpoint directory")
