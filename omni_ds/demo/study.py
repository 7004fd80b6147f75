"""The router study: dense / Switch / omni at several depths and seeds, each family at its own LR.

    omni-ds study configs/study.yaml        # corpus → LR sweep → seeds → export, eval, analyze

1. The embedded corpus and the letter tokenizer, as ``omni-ds demo`` makes them.
2. The sweep: every (router, depth) trains once per LR of ``sweep_lrs`` with ``sweep_seed``; the
   LR with the lowest final full-dev WER wins (ties: lower dev CTC loss). The rule is fixed here,
   before any run, and applies to every family alike, so no baseline loses by a stalled LR.
3. The comparison: the other seeds at the chosen LR (the sweep run is the ``sweep_seed`` run).
4. Export, ``omni-ds eval`` of all comparison runs together (seed groups, bootstrap CIs) and
   ``omni-ds analyze`` of every MoE run; then ``OUT/STUDY.md`` (:mod:`omni_ds.demo.study_report`).

Each training is one process with one thread (``parallel`` of them at a time), logging to
``OUT/logs/<run>.log``; a finished one is recorded in ``OUT/stages/`` and reused by the next
invocation, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from omni_ds.config.loading import from_dict
from omni_ds.demo.stages import DemoSettings, StageFailed, run_stage, stages

_CLI = [sys.executable, "-m", "omni_ds.cli"]


@dataclasses.dataclass(kw_only=True)
class StudySettings:
    """What the study trains and how it compares; ``configs/study.yaml`` holds its values."""

    out: Path = Path("runs/study")
    """Everything goes here: data/, runs/<run>/, models/, eval/, analysis/, STUDY.md."""
    experiment: Path = Path("configs/demo.yaml")
    """The experiment YAML every run starts from (router, depth, seed, LR are overridden)."""
    deepspeed: Path = Path("ds_configs/demo_cpu.json")
    """The DeepSpeed JSON every run starts from; LR, warmup and total steps are replaced."""
    train_utterances: int = 2400
    """Training utterances of the synthetic corpus."""
    routers: list[str] = dataclasses.field(default_factory=lambda: ["dense", "switch", "omni"])
    """``model.moe.router`` values compared."""
    depths: list[int] = dataclasses.field(default_factory=lambda: [4, 8])
    """``model.n_layers`` values (every block's FFN is MoE in the MoE models)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """``train.seed`` of the comparison runs (initialisation, data order, dropout)."""
    sweep_lrs: list[float] = dataclasses.field(default_factory=lambda: [3e-3, 1e-2])
    """Peak learning rates tried for every (router, depth)."""
    sweep_seed: int = 0
    """Seed of the sweep runs; must be one of ``seeds`` (the chosen LR's run is reused)."""
    steps: int = 300
    """Optimizer steps of every run; the LR decays linearly to 0 at the last step."""
    warmup_steps: int = 30
    """Linear warm-up steps from 0 to the peak LR."""
    batch_seconds: float = 40.0
    """Audio seconds per optimizer step (``data.max_batch_seconds``, one process)."""
    dev_every: int = 100
    """Full-dev evaluation every this many steps (the learning curves; the last one picks LRs)."""
    parallel: int = 3
    """Trainings at a time, one process and one thread each."""
    ctc_last_logs: int = 10
    """Training CTC is compared as the mean of this many last logged steps (every 10 steps)."""
    bootstrap_samples: int = 1000
    """Bootstrap replicates of the eval's confidence intervals."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling."""

    def __post_init__(self) -> None:
        from omni_ds.errors import ConfigError

        if self.sweep_seed not in self.seeds:
            raise ConfigError(f"sweep_seed: {self.sweep_seed} is not in seeds {self.seeds}")
        bad = sorted(set(self.routers) - {"dense", "switch", "omni"})
        if bad:
            raise ConfigError(f"routers: {bad} unknown; use dense, switch, omni")
        if self.steps < 1 or not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"steps / warmup_steps: {self.steps} / {self.warmup_steps}; "
                              "need steps >= 1 and 0 <= warmup_steps < steps")  # fmt: skip
        if not self.sweep_lrs or min(self.sweep_lrs) <= 0:
            raise ConfigError(f"sweep_lrs: {self.sweep_lrs}; give positive learning rates")
        if self.parallel < 1:
            raise ConfigError(f"parallel: {self.parallel} < 1; use 2 on 2 cores")


def load_settings(path: str | Path) -> StudySettings:
    return from_dict(StudySettings, yaml.safe_load(Path(path).read_text()) or {}, where="")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training of the study."""

    router: str
    depth: int
    lr: float
    seed: int

    @property
    def recipe(self) -> str:
        """The family: router and depth (``L4-omni``); seeds of one recipe share the LR."""
        return f"L{self.depth}-{self.router}"

    @property
    def name(self) -> str:
        return f"{self.recipe}-lr{self.lr:g}-s{self.seed}"


def ds_config_path(s: StudySettings, lr: float) -> Path:
    return s.out / "ds" / f"lr{lr:g}.json"


def write_ds_config(s: StudySettings, lr: float) -> Path:
    """The base DeepSpeed JSON with this peak LR, warm-up and decay to 0 at ``steps``."""
    cfg = json.loads(s.deepspeed.read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    sched = cfg["scheduler"]["params"]
    sched.update(warmup_max_lr=lr, warmup_num_steps=s.warmup_steps, total_num_steps=s.steps)
    path = ds_config_path(s, lr)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg, indent=1) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def run_dir(s: StudySettings, spec: RunSpec) -> Path:
    return s.out / "runs" / spec.name


def train_argv(s: StudySettings, spec: RunSpec) -> list[str]:
    data = s.out / "data"
    sets = [
        f"model.moe.router={spec.router}",
        "model.moe.ep_size=1",
        f"model.n_layers={spec.depth}",
        f"train.seed={spec.seed}",
        f"train.run_dir={run_dir(s, spec)}",
        f"train.max_steps={s.steps}",
        f"train.dev_every={s.dev_every}",
        "train.dev_max_batches=0",
        f"checkpoint.every_steps={max(1, s.steps // 2)}",
        f"data.max_batch_seconds={s.batch_seconds}",
        f"data.train=[{data / 'train'}]",
        f"data.dev={{dev: {data / 'dev'}}}",
        f"data.tokenizer={data / 'letters.model'}",
        f"deepspeed={ds_config_path(s, spec.lr)}",
    ]
    return [*_CLI, "train", str(s.experiment), *(a for x in sets for a in ("--set", x))]


def _train_params(s: StudySettings, spec: RunSpec) -> dict:
    return {"argv": train_argv(s, spec)[len(_CLI) :], "experiment": s.experiment.read_text(),
            "deepspeed": ds_config_path(s, spec.lr).read_text(),
            "train_utterances": s.train_utterances}  # fmt: skip


def _marker(s: StudySettings, spec: RunSpec) -> Path:
    return s.out / "stages" / f"train_{spec.name}.json"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train(s: StudySettings, spec: RunSpec) -> dict:
    """Runs (or reuses) one training; returns its record (params, seconds, reused)."""
    params, marker, run = _train_params(s, spec), _marker(s, spec), run_dir(s, spec)
    mark = _read(marker)
    same = mark is not None and mark.get("params") == params
    if same and mark.get("status") == "done" and (run / "checkpoints" / f"step_{s.steps}").is_dir():
        return {**mark, "reused": True}
    if run.exists() and not (same and mark.get("status") == "started"):
        shutil.rmtree(run)  # another setting's output; an interrupted run resumes instead
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"status": "started", "params": params}))
    log = s.out / "logs" / f"{spec.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "DS_ACCELERATOR" not in env:
        import torch

        env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(train_argv(s, spec), stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"training {spec.name} failed (exit {code}); see {log}")
    record = {"status": "done", "params": params, "seconds": seconds}
    marker.write_text(json.dumps(record, indent=1))
    print(f"[study] {spec.name} trained in {seconds:.0f} s", flush=True)
    return {**record, "reused": False}


def final_dev(s: StudySettings, spec: RunSpec) -> dict:
    """The last full-dev evaluation logged by the run (``wer``, ``loss``)."""
    rows = [json.loads(x) for x in (run_dir(s, spec) / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if r.get("kind") == "dev/dev" and r.get("step") == s.steps]
    if not dev:
        raise StageFailed(f"{spec.name}: no dev evaluation at step {s.steps} in metrics.jsonl")
    return dev[-1]


def choose_lrs(s: StudySettings, depths: list[int] | None = None) -> dict[str, dict]:
    """``{recipe: {"lr": chosen, "dev": {lr: (wer, loss)}}}`` by the rule of the module docstring."""
    out = {}
    for depth in depths or s.depths:
        for router in s.routers:
            scores = {}
            for lr in s.sweep_lrs:
                d = final_dev(s, RunSpec(router, depth, lr, s.sweep_seed))
                loss = d["loss"] if math.isfinite(d["loss"]) else math.inf
                scores[lr] = (d["wer"], loss)
            best = min(s.sweep_lrs, key=lambda lr: scores[lr])
            out[f"L{depth}-{router}"] = {
                "lr": best,
                "dev": {f"{lr:g}": scores[lr] for lr in scores},
            }
    return out


def comparison_specs(
    s: StudySettings, chosen: dict[str, dict], depths: list[int] | None = None
) -> list[RunSpec]:
    return [RunSpec(router, depth, chosen[f"L{depth}-{router}"]["lr"], seed)
            for depth in depths or s.depths for router in s.routers
            for seed in s.seeds]  # fmt: skip


def run_training(s: StudySettings) -> tuple[dict[str, dict], list[RunSpec], dict]:
    """Corpus, sweep, LR choice, comparison runs; returns (choice, comparison runs, records)."""
    demo = DemoSettings(out=s.out, train_utterances=s.train_utterances)
    for stage in stages(demo)[:2]:  # the corpus and the letter tokenizer, as the demo makes them
        mark = _read(s.out / "stages" / f"{stage.name}.json")
        if not (mark and mark.get("status") == "done" and mark.get("params") == stage.params
                and all(p.exists() for p in stage.outputs)):  # fmt: skip
            run_stage(stage, s.out)
    for lr in s.sweep_lrs:
        write_ds_config(s, lr)
    records: dict[RunSpec, dict] = {}
    chosen: dict[str, dict] = {}
    later = []
    with ThreadPoolExecutor(max_workers=s.parallel) as pool:

        def submit(specs: list[RunSpec]) -> dict:
            return {spec: pool.submit(train, s, spec) for spec in specs if spec not in records}

        def sweep(depth: int) -> list[RunSpec]:
            return [RunSpec(r, depth, lr, s.sweep_seed) for r in s.routers for lr in s.sweep_lrs]

        # Depth by depth, in the order of `depths`: a depth's comparison runs are queued before
        # the next depth's sweep, so on a loaded machine the first depths complete first.
        pending = submit(sweep(s.depths[0]))
        for i, depth in enumerate(s.depths):
            records.update({spec: job.result() for spec, job in pending.items()})
            chosen.update(choose_lrs(s, [depth]))
            print(f"[study] chosen LRs at depth {depth}: "
                  + ", ".join(f"{k} {chosen[k]['lr']:g}" for k in chosen if k.startswith(f"L{depth}-")),
                  flush=True)  # fmt: skip
            later.append(submit(comparison_specs(s, chosen, [depth])))
            pending = submit(sweep(s.depths[i + 1])) if i + 1 < len(s.depths) else {}
        for jobs in later:
            records.update({spec: job.result() for spec, job in jobs.items()})
    (s.out / "lr_choice.json").write_text(json.dumps(chosen, indent=1) + "\n")
    return chosen, comparison_specs(s, chosen), records
