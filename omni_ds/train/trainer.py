"""``omni-ds train``: a :class:`Trainer` that owns the engine, the loaders, the checkpointer, the
metrics, the counters and the stop flag of one run.

    omni-ds train configs/tiny.yaml --set train.run_dir=runs/tiny          # 1 process
    torchrun --nproc_per_node 2 -m omni_ds.cli train configs/tiny.yaml    # 2 processes
    deepspeed --num_gpus 2 --module omni_ds.cli train configs/tiny.yaml
    srun --ntasks-per-node 2 omni-ds train configs/tiny.yaml             # inside an allocation

:meth:`Trainer.train` reads like the workflow: resume from the latest complete checkpoint → loop
{train step, log, maybe dev eval, maybe checkpoint} → final checkpoint. One loader batch is one
DeepSpeed micro batch; ``gradient_accumulation_steps`` of them make an optimizer step, which is
what ``step`` counts.

Every collective happens at the same point on every rank: the per-micro-batch
``agree(non-finite, stop)`` all-reduce, the log-step metric means, saves and dev evaluations are
decided by step numbers or by rank 0's clock. On SIGUSR1/SIGTERM every rank saves at the next
step boundary and the process exits with :data:`EXIT_REQUEUE` (75); a stop that arrives before
the first step exits 75 at once, with nothing new to save.

Before anything is written into the run dir, rank 0 takes its lock (:mod:`omni_ds.train.run_lock`)
and every rank started by a launcher watches it (:mod:`omni_ds.train.launcher_watch`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from data_pipeline.audio import SAMPLE_RATE
from omni_ds import dist
from omni_ds.ckpt.saver import Checkpointer
from omni_ds.ckpt.select import select_resume
from omni_ds.config.checks import preflight
from omni_ds.config.experiment import ExperimentConfig
from omni_ds.config.loading import to_dict
from omni_ds.errors import ConfigError
from omni_ds.model import build_model
from omni_ds.model.balance import LoadMeter
from omni_ds.train.data import make_dev_sets, make_train_loader
from omni_ds.train.dev_eval import dev_scores
from omni_ds.train.engine import build_engine, close_monitors, describe_run, ds_config_for_run
from omni_ds.train.launcher_watch import watch_launcher
from omni_ds.train.metrics import (
    JsonLines,
    MetricsLog,
    expert_parallel_grad_norm,
    peak_tflops,
    routing_summary,
    step_flops,
)
from omni_ds.train.progress import Progress
from omni_ds.train.routing_trace import RoutingTrace
from omni_ds.train.run_lock import run_dir_lock
from omni_ds.train.signals import EXIT_REQUEUE, StopRequest

__all__ = ["EXIT_REQUEUE", "Counters", "NonFiniteLoss", "Trainer", "main"]


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging."""


@dataclasses.dataclass
class Counters:
    """Progress that is not in DeepSpeed's engine state, saved per rank in every checkpoint."""

    step: int = 0
    nonfinite_skipped: int = 0
    """Batches skipped for a non-finite loss; all ranks skip together, so equal on every rank."""
    samples: int = 0
    """Utterances this rank trained on (a tally: summed over ranks on a reshard)."""
    audio_seconds: float = 0.0
    """Audio this rank trained on (a tally)."""

    def state_dict(self) -> dict:
        tallies = {"samples": self.samples, "audio_seconds": self.audio_seconds}
        return {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped, "tallies": tallies}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite_skipped = state["step"], state["nonfinite_skipped"]
        tallies = state.get("tallies", state)  # before the tallies key, the counts were flat
        self.samples, self.audio_seconds = tallies["samples"], tallies["audio_seconds"]


@dataclasses.dataclass
class _Window:
    """Work done on this rank since the last metrics line, for the rates it reports."""

    audio_seconds: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


class _Step:
    """What one completed optimizer step left for logging."""

    def __init__(self, losses, out, grad_norm):
        self.losses, self.out, self.grad_norm = losses, out, grad_norm


class Trainer:
    """One run of ``cfg`` on this rank; every rank builds one and calls :meth:`train`."""

    def __init__(self, cfg: ExperimentConfig, ds_config: dict, info: dist.DistInfo,
                 stop: StopRequest):  # fmt: skip
        self.cfg, self.info, self.stop = cfg, info, stop
        self.run_dir = Path(cfg.train.run_dir)
        # First: a run dir whose checkpoints do not verify is refused before anything is built.
        self.resume_from = select_resume(self.run_dir / "checkpoints", cfg.checkpoint.resume)
        self.loader, self.tokenizer = make_train_loader(cfg, info.rank, info.world_size)
        self.dev_sets = make_dev_sets(cfg, info.rank, info.world_size, self.tokenizer)
        run_ds_config = ds_config_for_run(ds_config, self.run_dir)
        self.engine = build_engine(build_model(cfg.model), run_ds_config)
        describe_run(self.engine, to_dict(cfg), run_ds_config)
        self.model = self.engine.module
        self.checkpointer = Checkpointer(self.engine, self.run_dir, cfg.checkpoint,
                                         ep_size=cfg.model.moe.ep_size)  # fmt: skip
        self.counters = Counters()
        self.metrics: MetricsLog | None = None
        self.sample_log: JsonLines | None = None
        self.trace: RoutingTrace | None = None
        self.load_meter = LoadMeter()  # expert-bias balancing: the step's routes per expert
        self.stopping = False
        self._nonfinite_in_a_row = 0
        self._window = _Window()
        self._active_params = self.model.parameter_counts()[1]
        self._peak = peak_tflops(info.device, cfg.train.peak_tflops)

    def state_dict(self) -> dict:
        """This rank's state beside the engine's (``omni_ds.ckpt.rank_state`` says how it
        reshards)."""
        return {"counters": self.counters.state_dict(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.counters.load_state_dict(state["counters"])
        self.loader.load_state_dict(state["loader"])

    def resume(self) -> None:
        """Load the checkpoint ``checkpoint.resume`` selects (if any), then open the logs."""
        path = self.resume_from.path
        client = None
        if path is not None:
            client, rank_state = self.checkpointer.load(path)
            self.load_state_dict(rank_state)
        self._batches = iter(self.loader)
        if client is not None:  # last: nothing may draw random numbers before the first step
            self.checkpointer.restore_rng(client)
        if self.info.is_main:  # only once the checkpoint (if any) was accepted
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
            (self.run_dir / "config.yaml").write_text(text)
        self.metrics = MetricsLog(self.run_dir, self.engine.monitor, rank=self.info.rank)
        if self.cfg.train.log_samples:
            self.sample_log = JsonLines(self.run_dir / "samples" / f"rank{self.info.rank}.jsonl")
        if self.cfg.train.routing_trace_every:
            self.trace = RoutingTrace(self.run_dir, self.info.rank,
                                      every=self.cfg.train.routing_trace_every,
                                      frames=self.cfg.train.routing_trace_frames)  # fmt: skip
        # A crash may have logged steps past the checkpoint; the resumed run redoes them, and
        # readers keep the redone records (omni_ds.train.metrics.read_records).
        mark = {"checkpoint": path.name if path is not None else None,
                "passed_over": self.resume_from.passed_over}  # fmt: skip
        for log in (self.metrics, self.sample_log, self.trace):
            if log is not None:
                log.mark_resume(self.counters.step, **mark)

    def train(self) -> int:
        """Train to ``train.max_steps``; returns 0, or :data:`EXIT_REQUEUE` after a stop signal."""
        self.resume()
        if dist.agree(self.stop.requested)[0]:  # before the first step: nothing new to save
            self.close()
            return _stopped_before_the_first_step()
        tcfg = self.cfg.train
        self.progress = Progress(tcfg.max_steps, self.counters.step, enabled=self.info.is_main,
                                 bar=tcfg.progress_bar)  # fmt: skip
        while self.counters.step < tcfg.max_steps:
            done = self.train_step()
            if done is None:  # a skipped batch, or a micro step inside an accumulation window
                continue
            step = self.counters.step
            self.progress.step(step, done.losses.total.item())
            if self.trace is not None and self.trace.due(step):
                self.trace.record(step, done.out.routing, self.model)
            if step % tcfg.log_every == 0:
                values = self._log_values(done)
                self.metrics.write(step, values, samples=self.engine.global_samples)
                self.progress.log(step, values)
                self._window = _Window()
            last = step >= tcfg.max_steps
            if self.dev_sets and (last or (tcfg.dev_every and step % tcfg.dev_every == 0)):
                self.evaluate()
            if (
                self.stopping
                or self.checkpointer.due(step)
                or (last and self.cfg.checkpoint.save_final)
            ):
                self.checkpointer.save(step, {}, self.state_dict())
            if self.stopping:
                self.progress.close()
                print(f"stop signal: checkpoint at step {step}; exit {EXIT_REQUEUE}",
                      file=sys.stderr, flush=True)  # fmt: skip
                self.close()
                dist.shutdown()
                return EXIT_REQUEUE
        self.progress.close()
        self.close()
        return 0

    def _next_batch(self) -> dict:
        """The next batch; at the end of an epoch the loader starts the next one."""
        batch = next(self._batches, None)
        if batch is None:
            self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError("the training loader yields no batches; check data.train")
        return batch

    def train_step(self) -> _Step | None:
        """One micro batch: forward, agree, backward, step. Returns what to log when it completed
        an optimizer step, None for a skipped batch or a micro step within accumulation."""
        batch = self._next_batch()
        device = self.info.device
        log_now = (self.counters.step + 1) % self.cfg.train.log_every == 0
        trace_now = self.trace is not None and self.trace.due(self.counters.step + 1)
        audio, audio_lens = batch["audio"].to(device), batch["audio_lens"].to(device)
        tokens, token_lens = batch["tokens"].to(device), batch["token_lens"].to(device)
        out = self.engine(audio, audio_lens, return_stats=log_now or trace_now)
        losses = self.model.loss(out, tokens, token_lens)
        nonfinite, stop_now = dist.agree(not bool(torch.isfinite(losses.total)),
                                         self.stop.requested)  # fmt: skip
        self.stopping = self.stopping or stop_now
        if self.sample_log is not None:
            self.sample_log.write({"step": self.counters.step + 1, "keys": list(batch["keys"]),
                                   "skipped": nonfinite})  # fmt: skip
        if nonfinite:
            self._skip_nonfinite()
            return None
        self._nonfinite_in_a_row = 0
        self.load_meter.add(out.load)
        self.engine.backward(losses.total)
        grad_norm = None
        if self.engine.zero_optimization_stage() == 0 and log_now:
            grad_norm = expert_parallel_grad_norm(self.model)
        self.engine.step()
        seconds = float(audio_lens.sum()) / SAMPLE_RATE
        self.counters.samples += len(batch["keys"])
        self.counters.audio_seconds += seconds
        self._window.audio_seconds += seconds
        self._window.tokens += float(token_lens.sum())
        self._window.flops += step_flops(self._active_params, self.cfg.model.n_layers,
                                         self.cfg.model.d_model, out.out_lens)  # fmt: skip
        if self.engine.global_steps == self.counters.step:  # inside an accumulation window
            return None
        self.counters.step = self.engine.global_steps
        self.load_meter.update(self.model)  # the expert bias moves after the optimizer step
        return _Step(losses, out, grad_norm)

    def _skip_nonfinite(self) -> None:
        self.counters.nonfinite_skipped += 1
        self._nonfinite_in_a_row += 1
        if self._nonfinite_in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
            raise NonFiniteLoss(
                f"{self._nonfinite_in_a_row} non-finite losses in a row at step "
                f"{self.counters.step} (skipped {self.counters.nonfinite_skipped} batches in "
                "total); lower the learning rate, check the data, or resume from an earlier "
                "checkpoint"
            )

    def _log_values(self, done: _Step) -> dict[str, float]:
        """One metrics line; collective (every rank calls it at the same step)."""
        losses, window = done.losses, self._window
        values = dist.mean_over_ranks({
            "loss": losses.total.item(),
            "ctc": losses.ctc.item(),
            "balance": losses.balance.item(),
            "z": losses.z.item(),
            **routing_summary(done.out.routing),
        })  # fmt: skip
        totals = dist.sum_over_ranks({
            "window_audio_seconds": window.audio_seconds,
            "tokens": window.tokens,
            "flops": window.flops,
            "samples": self.counters.samples,
            "audio_seconds": self.counters.audio_seconds,
            "data_retries": self.loader.retries(),
        })  # fmt: skip
        elapsed = time.perf_counter() - window.start
        norm = done.grad_norm if done.grad_norm is not None else self.engine.get_global_grad_norm()
        skipped = dist.sum_counts_over_ranks(self.loader.skipped())
        peak = self._peak * 1e12 * dist.world_size()
        return {
            **values,
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(norm) if norm is not None else math.nan,
            "audio_seconds_per_s": totals["window_audio_seconds"] / elapsed,
            "tokens_per_s": totals["tokens"] / elapsed,
            "mfu": totals["flops"] / elapsed / peak if peak else 0.0,
            "samples": totals["samples"],
            "audio_hours": totals["audio_seconds"] / 3600,
            "nonfinite_skipped": self.counters.nonfinite_skipped,
            "data_retries": int(totals["data_retries"]),  # transient storage failures retried
            **{f"skipped/{k}": v for k, v in skipped.items()},
        }

    def evaluate(self) -> None:
        """Dev loss and WER of every dev set, logged as ``dev/<name>`` (collective)."""
        scores = dev_scores(self.engine, self.dev_sets, self.tokenizer,
                            self.cfg.train.dev_max_batches)  # fmt: skip
        for name, values in scores.items():
            self.metrics.write(self.counters.step, values, kind=f"dev/{name}",
                               samples=self.engine.global_samples)  # fmt: skip
            self.progress.dev(self.counters.step, name, values)

    def close(self) -> None:
        for log in (self.metrics, self.sample_log, self.trace):
            if log is not None:
                log.close()
        close_monitors(self.engine)


def _stopped_before_the_first_step() -> int:
    print(f"stop signal before the first step; exit {EXIT_REQUEUE}", file=sys.stderr, flush=True)
    dist.shutdown()
    return EXIT_REQUEUE


def train(cfg: ExperimentConfig, ds_config: dict, stop: StopRequest) -> int:
    """Train ``cfg`` (already checked) with DeepSpeed ``ds_config``; returns the exit code.
    ``stop`` was installed before anything else (and before loader workers fork: they inherit
    its harmless flag handler)."""
    info = dist.init_distributed()
    watch_launcher(info.env.launcher)
    dist.seed_everything(cfg.train.seed, info.rank)
    with run_dir_lock(Path(cfg.train.run_dir)):
        if dist.agree(stop.requested)[0]:  # already asked to stop: build nothing
            return _stopped_before_the_first_step()
        code = Trainer(cfg, ds_config, info, stop).train()
    if code == 0:
        dist.shutdown()
    return code


def main(config: str, overrides: list[str], resume: str | None = None,
         stop: StopRequest | None = None) -> int:  # fmt: skip
    """``omni-ds train``: check the config for this world size, then train."""
    launch = dist.detect_launch_env()
    if resume is not None:
        overrides = [*overrides, f"checkpoint.resume={resume}"]
    checked = preflight(config, overrides, launch.world_size)
    if checked.problems:
        raise ConfigError(f"{config}: {len(checked.problems)} problem(s):\n"
                          + "\n".join(f"  - {p}" for p in checked.problems))  # fmt: skip
    if launch.rank == 0:
        for w in checked.warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)
    if stop is None:
        with StopRequest() as stop:
            return train(checked.cfg, checked.ds, stop)
    return train(checked.cfg, checked.ds, stop)
