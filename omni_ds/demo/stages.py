"""The end-to-end demo as a list of stages, each one an ``omni-ds`` command run as a subprocess.

corpus (``omni-ds synth``: FLAC shards + index + tokenizer) → train dense, Switch, omni, each
with ``seeds`` seeds (``torchrun --nproc_per_node 2 ... omni-ds train``) → export each →
``omni-ds eval`` of all of them on dev and the shifted test sets (seed groups, bootstrap
intervals) → ``omni-ds analyze`` of Switch and omni (seed 0) → ``REPORT.md``.

A stage that finished writes ``OUT/stages/<name>.json`` (its parameters and wall time); the next
run skips it while the parameters match and its outputs exist, and reruns every stage that
depends on one that ran. An interrupted training resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROUTERS = ("dense", "switch", "omni")
SHIFTED = ("test_unseen_speakers", "test_fast", "test_noisy", "test_telephone")
TEST_SETS = ("dev", *SHIFTED)
CONFIG = Path("configs/demo.yaml")
_CLI = [sys.executable, "-m", "omni_ds.cli"]
_TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


class StageFailed(RuntimeError):
    """A stage's command exited with a non-zero code."""


@dataclasses.dataclass(kw_only=True)
class DemoSettings:
    """What the demo trains and evaluates; every field is part of the stages' parameters."""

    out: Path = Path("runs/demo")
    """Everything goes here: data/, <router>/ run dirs, models/, eval/, analysis/, REPORT.md."""
    steps: int = 250
    """Optimizer steps of each of the three trainings (the LR of ``ds_configs/demo_cpu.json``
    decays to 0 at step 250; raise its ``total_num_steps`` to train longer)."""
    train_utterances: int = 2400
    """Training utterances of the synthetic corpus (held-out sets get 1/12 each)."""
    nproc: int = 2
    """Training processes; the MoE models use ep_size = nproc."""
    config: Path = CONFIG
    """The experiment YAML shared by the three models (the router is overridden)."""
    seeds: int = 1
    """Trainings per router, with ``train.seed`` 0, 1, ...; eval reports mean ± std and
    intervals that include the seed-to-seed variation."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds: {self.seeds} < 1; use 1 or 2")
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps} < 1; use e.g. 250")
        if self.train_utterances < 24:
            raise ValueError(f"train_utterances: {self.train_utterances} < 24; use e.g. 2400")
        if self.nproc < 1:
            raise ValueError(f"nproc: {self.nproc} < 1; use 2")


@dataclasses.dataclass(kw_only=True)
class Stage:
    """One step of the demo: a command, what it must leave behind, and what it depends on."""

    name: str
    """Key of its record ``OUT/stages/<name>.json``."""
    title: str
    """What the stage log line says."""
    argv: list[str]
    """The command, run as a subprocess with its output streaming through."""
    outputs: list[Path]
    """All must exist for a recorded stage to count as finished."""
    params: dict
    """Settings the outputs depend on; a recorded stage with other params is rerun."""
    deps: tuple[str, ...] = ()
    """Stages whose rerun makes this one rerun."""
    clean: Path | None = None
    """Removed before the stage runs with new parameters (stale outputs of another setting)."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def shown(argv: list[str]) -> str:
    """The command as a user would type it (``omni-ds``/``torchrun`` instead of the interpreter)."""
    text = shlex.join(argv)
    return text.replace(shlex.join(_CLI), "omni-ds").replace(shlex.join(_TORCHRUN), "torchrun")


def run_name(router: str, seed: int) -> str:
    """``dense`` for seed 0 (as with one seed), ``dense-s1`` for seed 1, ..."""
    return router if seed == 0 else f"{router}-s{seed}"


def _train_env(nproc: int) -> dict[str, str]:
    # torchrun would set 1 thread per rank (and print a banner saying so); share the cores.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    import torch

    if not torch.cuda.is_available():  # else every rank prints DeepSpeed's CPU fallback warning
        env["DS_ACCELERATOR"] = "cpu"
    return env


def stages(s: DemoSettings) -> list[Stage]:
    out, data = s.out, s.out / "data"
    corpus = {"train_utterances": s.train_utterances}
    tokenizer = data / "letters.model"
    result = [
        Stage(
            name="corpus",
            title="synthesize the corpus: FLAC shards, index, tokenizer",
            argv=[*_CLI, "synth", str(data), "--train-utterances", str(s.train_utterances)],
            outputs=[data / "tokenizer.model", *(data / n / "index.json" for n in TEST_SETS)],
            params=corpus,
            clean=data,
        ),
        # Letters, not the synth's default word pieces: CTC over letters learns in a third of
        # the steps (each letter has its own spectrum; a word is a sequence of them).
        Stage(
            name="tokenizer",
            title="train a letter tokenizer on the training transcripts",
            argv=[
                *_CLI,
                "train-tokenizer",
                str(data / "train"),
                "--vocab",
                "32",
                "--model-type",
                "char",
                "--out",
                str(data / "letters"),
            ],  # fmt: skip
            outputs=[tokenizer],
            params=corpus,
            deps=("corpus",),
        ),
    ]
    config_text = s.config.read_text()
    names = [run_name(r, seed) for r in ROUTERS for seed in range(s.seeds)]
    for router in ROUTERS:
        for seed in range(s.seeds):
            result.append(_train_stage(s, router, seed, config_text, tokenizer))
    for name in names:
        model = out / "models" / name
        result.append(
            Stage(
                name=f"export_{name}",
                title=f"export {name} to a model directory",
                argv=[*_CLI, "export", str(out / name), "--out", str(model)],
                outputs=[model / "model.safetensors", model / "config.json"],
                params={},
                deps=(f"train_{name}",),
                clean=model,
            )
        )
    models = [str(out / "models" / n) for n in names]
    result.append(
        Stage(
            name="eval",
            title=f"WER and CER of the {len(names)} models on dev and the shifted test sets",
            argv=[
                *_CLI,
                "eval",
                *models,
                "--out",
                str(out / "eval"),
                *(a for n in TEST_SETS for a in ("--test-set", f"{n}={data / n}")),
            ],  # fmt: skip
            outputs=[out / "eval" / "eval.json"],
            params={"sets": list(TEST_SETS), "models": names},
            deps=tuple(f"export_{n}" for n in names),
            clean=out / "eval",
        )
    )
    for router in ROUTERS[1:]:
        dest = out / "analysis" / router
        result.append(
            Stage(
                name=f"analyze_{router}",
                title=f"routing analysis of {router} on dev",
                argv=[
                    *_CLI,
                    "analyze",
                    str(out / "models" / router),
                    "--test-set",
                    f"dev={data / 'dev'}",
                    "--out",
                    str(dest),
                ],  # fmt: skip
                outputs=[dest / "analysis.json", dest / "agreement.png"],
                params={},
                deps=(f"export_{router}",),
                clean=dest,
            )
        )
    return result


def _train_stage(s: DemoSettings, router: str, seed: int, config_text: str, tokenizer: Path):
    data, name = s.out / "data", run_name(router, seed)
    ep_size = 1 if router == "dense" else s.nproc
    run = s.out / name
    sets = [
        f"model.moe.router={router}",
        f"model.moe.ep_size={ep_size}",
        f"train.run_dir={run}",
        f"train.max_steps={s.steps}",
        f"data.train=[{data / 'train'}]",
        f"data.dev={{dev: {data / 'dev'}}}",
        f"data.tokenizer={tokenizer}",
        f"train.seed={seed}",
    ]
    params = {"train_utterances": s.train_utterances, "steps": s.steps, "nproc": s.nproc,
              "config": config_text}  # fmt: skip
    if seed:  # seed 0's record stays that of a one-seed demo, which it reuses
        params["seed"] = seed
    launch = [*_TORCHRUN, "--standalone", f"--nproc_per_node={s.nproc}", "-m", "omni_ds.cli"]
    return Stage(
        name=f"train_{name}",
        title=f"train {name} ({s.steps} steps, {s.nproc} processes, ep_size {ep_size})",
        argv=[*launch, "train", str(s.config), *(a for x in sets for a in ("--set", x))],
        outputs=[run / "checkpoints" / f"step_{s.steps}", run / "metrics.jsonl"],
        params=params,
        deps=("tokenizer",),
        clean=run,
        env=_train_env(s.nproc),
    )


def _marker(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(stage: Stage, out: Path) -> dict | None:
    mark = _read_marker(_marker(out, stage.name))
    if mark is None or mark.get("status") != "done" or mark.get("params") != stage.params:
        return None
    return mark if all(p.exists() for p in stage.outputs) else None


def run_stage(stage: Stage, out: Path) -> float:
    """Runs the stage's command with its output streaming to this terminal; returns seconds."""
    marker = _marker(out, stage.name)
    previous = _read_marker(marker)
    # Started with the same parameters and never finished: an interrupted run, whose training
    # resumes from its checkpoints. Anything else starts from a clean output directory.
    interrupted = (
        previous is not None
        and previous.get("status") == "started"
        and previous.get("params") == stage.params
    )
    if stage.clean is not None and stage.clean.exists() and not interrupted:
        shutil.rmtree(stage.clean)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"status": "started", "params": stage.params}))
    start = time.perf_counter()
    code = subprocess.call(stage.argv, env={**os.environ, **stage.env})
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"stage {stage.name} failed (exit {code}): {shown(stage.argv)}")
    record = {"status": "done", "params": stage.params, "seconds": seconds,
              "command": shown(stage.argv)}  # fmt: skip
    marker.write_text(json.dumps(record, indent=1))
    return seconds


@dataclasses.dataclass
class StageTime:
    """How long a stage took, now or (``reused``) when it last ran."""

    name: str
    seconds: float
    reused: bool
    command: str


def run_demo(s: DemoSettings, force: bool = False) -> list[StageTime]:
    """Runs (or reuses) every stage in order; returns each stage's time."""
    plan = stages(s)
    ran: set[str] = set()
    times = []
    for i, stage in enumerate(plan, 1):
        mark = None if force else _finished(stage, s.out)
        if mark is not None and not ran.intersection(stage.deps):
            print(f"[demo {i}/{len(plan)}] {stage.title}: reused ({mark['seconds']:.0f} s when "
                  f"it ran; outputs in place)", flush=True)  # fmt: skip
            times.append(StageTime(stage.name, mark["seconds"], True, mark["command"]))
            continue
        print(f"\n[demo {i}/{len(plan)}] {stage.title}\n  $ {shown(stage.argv)}", flush=True)
        seconds = run_stage(stage, s.out)
        print(f"[demo {i}/{len(plan)}] {stage.name} done in {seconds:.0f} s", flush=True)
        ran.add(stage.name)
        times.append(StageTime(stage.name, seconds, False, shown(stage.argv)))
    return times
