"""``omni-ds train``: the training loop, flat and in one place.

    omni-ds train configs/tiny.yaml --set train.run_dir=runs/tiny          # 1 process
    torchrun --nproc_per_node 2 -m omni_ds.cli train configs/tiny.yaml    # 2 processes
    deepspeed --num_gpus 2 --no_local_rank --module omni_ds.cli train configs/tiny.yaml
    srun --ntasks-per-node 2 omni-ds train configs/tiny.yaml             # inside an allocation

Reads like the workflow: check the config → bring up the ranks → build loader, model and
DeepSpeed engine → load the latest complete checkpoint → loop {forward, agree on non-finite
loss and stop signals, backward + step, log, maybe checkpoint, maybe dev eval} → final
checkpoint. One loader batch is one DeepSpeed micro batch; ``gradient_accumulation_steps`` of
them make an optimizer step, which is what ``step`` counts.

Every collective happens at the same point on every rank: the per-micro-batch
``agree(non-finite, stop)`` all-reduce, the log-step metric means, saves and dev evaluations are
decided by step numbers or by rank 0's clock. On SIGUSR1/SIGTERM every rank saves at the next
step boundary and the process exits with :data:`EXIT_REQUEUE` (75).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from omni_ds import dist
from omni_ds.checkpoint import Checkpointer
from omni_ds.config import ConfigError, to_dict
from omni_ds.data import make_dev_sets, make_train_loader
from omni_ds.dev_eval import dev_scores
from omni_ds.engine import build_engine, ds_config_for_run
from omni_ds.experiment import ExperimentConfig
from omni_ds.metrics import (
    JsonLines,
    MetricsLog,
    expert_parallel_grad_norm,
    mean_over_ranks,
    peak_tflops,
    routing_summary,
    step_flops,
    sum_counts_over_ranks,
    sum_over_ranks,
)
from omni_ds.model import build_model
from omni_ds.signals import EXIT_REQUEUE, StopRequest, agree

__all__ = ["EXIT_REQUEUE", "NonFiniteLoss", "Counters", "train"]


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging."""


@dataclasses.dataclass
class Counters:
    """This rank's progress that is not in DeepSpeed's engine state; saved per rank in every
    checkpoint (``samples`` and ``audio_seconds`` differ between ranks)."""

    step: int = 0
    samples: int = 0
    audio_seconds: float = 0.0
    nonfinite_skipped: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclasses.dataclass
class _Window:
    """Work done on this rank since the last metrics line, for the rates it reports."""

    audio_seconds: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


def _log_values(engine, losses, out, window: _Window, counters: Counters, loader, grad_norm,
                peak: float) -> dict[str, float]:  # fmt: skip
    """One metrics line; collective (every rank calls it at the same step)."""
    values = mean_over_ranks(
        {
            "loss": losses.total.item(),
            "ctc": losses.ctc.item(),
            "balance": losses.balance.item(),
            "z": losses.z.item(),
            **routing_summary(out.routing),
        }
    )
    totals = sum_over_ranks(
        {
            "window_audio_seconds": window.audio_seconds,
            "tokens": window.tokens,
            "flops": window.flops,
            "samples": counters.samples,
            "audio_seconds": counters.audio_seconds,
        }
    )
    elapsed = time.perf_counter() - window.start
    devices = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    norm = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
    skipped = sum_counts_over_ranks(loader.skipped())
    return {
        **values,
        "lr": engine.get_lr()[0],
        "grad_norm": float(norm) if norm is not None else math.nan,
        "audio_seconds_per_s": totals["window_audio_seconds"] / elapsed,
        "tokens_per_s": totals["tokens"] / elapsed,
        "mfu": totals["flops"] / elapsed / (peak * 1e12 * devices) if peak else 0.0,
        "samples": totals["samples"],
        "audio_hours": totals["audio_seconds"] / 3600,
        "nonfinite_skipped": counters.nonfinite_skipped,
        **{f"skipped/{k}": v for k, v in skipped.items()},
    }


def _write_resolved_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def train(cfg: ExperimentConfig, ds_config: dict) -> int:
    """Train ``cfg`` (already checked) with DeepSpeed ``ds_config``; returns the exit code."""
    info = dist.init_distributed()
    run_dir = Path(cfg.train.run_dir)
    dist.seed_everything(cfg.train.seed, info.rank)
    # Before the loader starts workers: forked workers inherit the harmless flag handler.
    with StopRequest() as stop:
        loader, tokenizer = make_train_loader(cfg, info.rank, info.world_size)
        dev_sets = make_dev_sets(cfg, info.rank, info.world_size, tokenizer)
        engine = build_engine(build_model(cfg.model), ds_config_for_run(ds_config, run_dir))
        model = engine.module
        checkpoints = Checkpointer(engine, run_dir, cfg.checkpoint, ep_size=cfg.model.moe.ep_size)
        counters = Counters()
        resume = checkpoints.resume_path(cfg.checkpoint.resume)
        client = None
        if resume is not None:
            client, rank_state = checkpoints.load(resume)
            counters.load_state_dict(rank_state["counters"])
            loader.load_state_dict(rank_state["loader"])
        batches = iter(loader)
        if client is not None:  # last: nothing may draw random numbers before the first step
            checkpoints.restore_rng(client)
        if info.is_main:  # only once the checkpoint (if any) was accepted
            _write_resolved_config(cfg, run_dir)
        metrics = MetricsLog(run_dir, engine.monitor, rank=info.rank)
        sample_log = None
        if cfg.train.log_samples:
            sample_log = JsonLines(run_dir / "samples" / f"rank{info.rank}.jsonl")
        # A crash may have logged steps past the checkpoint; the resumed run redoes them.
        for log in (metrics, sample_log):
            if log is not None:
                log.truncate_after(counters.step)
        code = _loop(cfg, engine, model, loader, batches, dev_sets, tokenizer, checkpoints, counters,
                     metrics, sample_log, stop, info)  # fmt: skip
        metrics.close()
        if sample_log is not None:
            sample_log.close()
    if code == 0:
        dist.shutdown()
    return code


def _next_batch(batches):
    """The next batch, or None at the end of the epoch, without touching the global RNGs.

    A loader may draw from them (a torch DataLoader draws its workers' base seed when an epoch
    starts); those draws stay out of the stream that dropout, SpecAugment and CAPE use, so a
    resumed run draws exactly what the uninterrupted run drew."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        return next(batches, None)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _loop(cfg, engine, model, loader, batches, dev_sets, tokenizer, checkpoints, counters, metrics,
          sample_log, stop, info) -> int:  # fmt: skip
    tcfg = cfg.train
    zero_stage = engine.zero_optimization_stage()
    active = model.parameter_counts()[1]
    peak = peak_tflops(info.device, tcfg.peak_tflops)
    bar = None
    if info.is_main and tcfg.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.max_steps, initial=counters.step, desc="train", dynamic_ncols=True)
    window = _Window()
    in_a_row, stopping = 0, False
    fresh = False  # a resumed iterator may sit at the end of its epoch
    while counters.step < tcfg.max_steps:
        batch = _next_batch(batches)
        if batch is None:  # end of an epoch: the loader starts the next one
            if fresh:
                raise RuntimeError("the training loader yields no batches; check data.train")
            batches, fresh = iter(loader), True
            continue
        fresh = False
        log_now = (counters.step + 1) % tcfg.log_every == 0
        audio = batch["audio"].to(info.device)
        audio_lens = batch["audio_lens"].to(info.device)
        tokens, token_lens = batch["tokens"].to(info.device), batch["token_lens"].to(info.device)
        out = engine(audio, audio_lens, return_stats=log_now)
        losses = model.loss(out, tokens, token_lens)
        nonfinite, stop_now = agree(not bool(torch.isfinite(losses.total)), stop.requested)
        stopping = stopping or stop_now
        if sample_log is not None:
            sample_log.write({"step": counters.step + 1, "keys": list(batch["keys"]),
                           "skipped": nonfinite})  # fmt: skip
        if nonfinite:
            counters.nonfinite_skipped += 1
            in_a_row += 1
            if in_a_row >= tcfg.max_nonfinite_in_a_row:
                raise NonFiniteLoss(
                    f"{in_a_row} non-finite losses in a row at step {counters.step} (skipped "
                    f"{counters.nonfinite_skipped} batches in total); lower the learning rate, "
                    "check the data, or resume from an earlier checkpoint"
                )
            continue
        in_a_row = 0
        engine.backward(losses.total)
        grad_norm = expert_parallel_grad_norm(model) if zero_stage == 0 and log_now else None
        engine.step()
        counters.samples += len(batch["keys"])
        seconds = float(audio_lens.sum()) / 16000.0
        counters.audio_seconds += seconds
        window.audio_seconds += seconds
        window.tokens += float(token_lens.sum())
        window.flops += step_flops(active, cfg.model.n_layers, cfg.model.d_model, out.out_lens)
        if engine.global_steps == counters.step:  # inside a gradient-accumulation window
            continue
        counters.step = engine.global_steps
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses.total.item():.3f}")
        if log_now:
            values = _log_values(engine, losses, out, window, counters, loader, grad_norm, peak)
            metrics.write(counters.step, values)
            window = _Window()
        last = counters.step >= tcfg.max_steps
        if dev_sets and (last or (tcfg.dev_every and counters.step % tcfg.dev_every == 0)):
            for name, scores in dev_scores(
                engine, dev_sets, tokenizer, tcfg.dev_max_batches
            ).items():
                metrics.write(counters.step, scores, kind=f"dev/{name}")
        if stopping or checkpoints.due(counters.step) or (last and cfg.checkpoint.save_final):
            rank_state = {"counters": counters.state_dict(), "loader": loader.state_dict()}
            checkpoints.save(counters.step, {}, rank_state)
        if stopping:
            if bar is not None:
                bar.close()
            print(f"stop signal: checkpoint at step {counters.step}; exit {EXIT_REQUEUE}",
                  file=sys.stderr, flush=True)  # fmt: skip
            dist.shutdown()
            return EXIT_REQUEUE
    if bar is not None:
        bar.close()
    return 0


def main(config: str, overrides: list[str], resume: str | None = None) -> int:
    """``omni-ds train``: check the config for this world size, then train."""
    from omni_ds.checks import check_experiment

    world_size = dist.detect_launch_env().world_size
    if resume is not None:
        overrides = [*overrides, f"checkpoint.resume={resume}"]
    cfg, ds_config, problems = check_experiment(config, overrides, world_size)
    fp16 = ds_config is not None and (ds_config.get("fp16") or {}).get("enabled")
    if fp16 and not torch.cuda.is_available():
        problems.append(
            f"deepspeed: fp16.enabled: true on a host without a GPU; DeepSpeed's CPU accelerator "
            f"refuses fp16; use ds_configs/zero1_fp32.json or zero2_bf16.json here "
            f"({cfg.deepspeed} is for GPUs)"
        )
    if problems:
        raise ConfigError(
            f"{config}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return train(cfg, ds_config)
