"""The router study's evaluation and report: export, ``omni-ds eval``, ``omni-ds analyze``, STUDY.md.

Every comparison run is exported to ``OUT/models/<run>``; one ``omni-ds eval`` scores all of them
on dev and the test sets (seed groups, paired bootstrap intervals of every pair); ``omni-ds
analyze`` measures each MoE run's cross-layer NMI and random-routing ablation on the in-domain
``test`` set. ``OUT/STUDY-<depths>.md`` gathers the tables (the text of docs/research.md's study section
is written from it by hand, with the numbers copied, not retyped).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from omni_ds.demo.stages import StageFailed
from omni_ds.demo.study import RunSpec, StudySettings, final_dev, run_dir

_CLI = [sys.executable, "-m", "omni_ds.cli"]
TEST_SETS = ("test", "test_unseen_speakers", "test_fast", "test_noisy", "test_telephone")
ANALYSIS_SET = "test"
"""The set ``omni-ds analyze`` runs on (in-domain, not the dev set that chose the LRs)."""


def _run(argv: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise StageFailed(f"{argv[3]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def _done(path: Path, newer_than: Path) -> bool:
    return path.exists() and path.stat().st_mtime >= newer_than.stat().st_mtime


def tag(s: StudySettings) -> str:
    """``L4-L8``: the depths evaluated, naming OUT/eval-<tag>/ and OUT/STUDY-<tag>.md."""
    return "-".join(f"L{d}" for d in s.depths)


def evaluate(s: StudySettings, runs: list[RunSpec]) -> dict[str, float]:
    """Export, eval and analyze (each skipped when its output is newer than its input);
    returns the seconds each part took now."""
    models = s.out / "models"
    logs = s.out / "logs"
    ckpt = {r: run_dir(s, r) / "checkpoints" / f"step_{s.steps}" for r in runs}
    todo = [r for r in runs if not _done(models / r.name / "config.json", ckpt[r])]
    seconds = {}
    with ThreadPoolExecutor(max_workers=s.parallel) as pool:
        start = time.perf_counter()
        list(pool.map(lambda r: _run([*_CLI, "export", str(run_dir(s, r)), "--out",
                                      str(models / r.name)], logs / f"export-{r.name}.log"),
                      todo))  # fmt: skip
        seconds["export"] = time.perf_counter() - start
        data = s.out / "data"
        # Dev is not scored again: its WER is the training's final full-dev evaluation (the one
        # that chose the LRs; test_eval_cli shows the two agree exactly).
        sets = [a for n in TEST_SETS for a in ("--test-set", f"{n}={data / n}")]
        eval_dir = s.out / f"eval-{tag(s)}"
        eval_json = eval_dir / "eval.json"
        newest = max(
            (models / r.name / "config.json" for r in runs), key=lambda p: p.stat().st_mtime
        )
        start = time.perf_counter()
        if not _done(eval_json, newest):
            # Decoding is the cost: one model per process, then one pass scores them together.
            list(pool.map(lambda r: _run([*_CLI, "eval", str(models / r.name), *sets, "--out",
                                          str(eval_dir), "--reuse-hyps", "--bootstrap", "0"],
                                         logs / f"eval-{r.name}.log"), runs))  # fmt: skip
            argv = [*_CLI, "eval", *(str(models / r.name) for r in runs), *sets, "--out",
                    str(eval_dir), "--reuse-hyps", "--bootstrap", str(s.bootstrap_samples),
                    "--bootstrap-seed", str(s.bootstrap_seed)]  # fmt: skip
            eval_job = pool.submit(_run, argv, logs / f"eval-{tag(s)}.log")
        else:
            eval_job = None
        moe = [r for r in runs if r.router != "dense"]
        todo = [r for r in moe if not _done(s.out / "analysis" / r.name / "analysis.json",
                                            models / r.name / "config.json")]  # fmt: skip
        list(pool.map(lambda r: _run([*_CLI, "analyze", str(models / r.name), "--test-set",
                                      f"{ANALYSIS_SET}={data / ANALYSIS_SET}", "--out",
                                      str(s.out / "analysis" / r.name)],
                                     logs / f"analyze-{r.name}.log"), todo))  # fmt: skip
        if eval_job is not None:
            eval_job.result()
        seconds["eval+analyze"] = time.perf_counter() - start
    return seconds


def _ctc(s: StudySettings, spec: RunSpec) -> float:
    rows = [json.loads(x) for x in (run_dir(s, spec) / "metrics.jsonl").read_text().splitlines()]
    ctc = [r["ctc"] for r in rows if r.get("kind") == "train" and "ctc" in r][-s.ctc_last_logs :]
    return float(np.mean(ctc)) if ctc else math.nan


def _dev(s: StudySettings, spec: RunSpec) -> float:
    return final_dev(s, spec)["wer"]


def _curve(s: StudySettings, spec: RunSpec) -> list[float]:
    rows = [json.loads(x) for x in (run_dir(s, spec) / "metrics.jsonl").read_text().splitlines()]
    return [r["wer"] for r in rows if r.get("kind") == "dev/dev"]


def _pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.array(values, dtype=float) * scale
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def _iv(cell: dict) -> str:
    text = f"{100 * cell['diff']:+.2f} [{100 * cell['low']:+.2f}, {100 * cell['high']:+.2f}]"
    return text + (" *" if cell["significant"] else "")


def write_report(
    s: StudySettings,
    settings: Path,
    chosen: dict,
    runs: list[RunSpec],
    records: dict,
    seconds: dict,
) -> Path:
    """``OUT/STUDY.md``: LR sweep, the per-recipe table, the pairwise intervals, run times."""
    data = json.loads((s.out / f"eval-{tag(s)}" / "eval.json").read_text())
    groups = {g["name"]: g for g in data["groups"]}
    recipes = list(dict.fromkeys(r.recipe for r in runs))
    by_recipe = {k: [r for r in runs if r.recipe == k] for k in recipes}
    group_of = {k: next(g for g in groups.values() if by_recipe[k][0].name in g["runs"])["name"]
                for k in recipes}  # fmt: skip
    lines = ["# Router study", "", f"Settings: `{settings}`; depths {s.depths}.", ""]
    lines += [f"## LR sweep (seed {s.sweep_seed}, final full-dev WER %, lowest chosen)", "",
              "| recipe | " + " | ".join(f"lr {lr:g}" for lr in s.sweep_lrs) + " | chosen |",
              "| --- |" + " ---: |" * (len(s.sweep_lrs) + 1)]  # fmt: skip
    for k, c in chosen.items():
        cells = [f"{100 * c['dev'][f'{lr:g}'][0]:.1f}" for lr in s.sweep_lrs]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {c['lr']:g} |")
    lines += ["", "## Results (mean ± std over seeds)", "",
              "| recipe | LR | train CTC | dev WER | test-set mean WER | test-set mean CER | "
              "cross-layer NMI | random routing: WER increase (points) | dev WER curve (seed mean) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for k in recipes:
        g, specs = groups[group_of[k]], by_recipe[k]
        ctc = [_ctc(s, r) for r in specs]
        nmi, rr = "–", "–"
        if specs[0].router != "dense":
            an = [json.loads((s.out / "analysis" / r.name / "analysis.json").read_text())
                  for r in specs]  # fmt: skip
            nmi = _pm([a["mean_offdiagonal_nmi"] for a in an], 1.0, 3)
            rr = _pm([a["random_routing"]["absolute_increase"] for a in an])
        curve = np.mean([_curve(s, r) for r in specs], axis=0)
        lines.append(
            f"| {k} | {specs[0].lr:g} | {_pm(ctc, 1.0, 3)} | "
            f"{_pm([_dev(s, r) for r in specs])} | "
            f"{100 * g['wer']['mean'][0]:.1f} ± {100 * g['wer']['mean'][1]:.1f} | "
            f"{100 * g['cer']['mean'][0]:.1f} ± {100 * g['cer']['mean'][1]:.1f} | {nmi} | {rr} | "
            + " → ".join(f"{100 * w:.0f}" for w in curve)
            + " |"
        )
    names = [n for n in data["models"][0]["sets"]]
    lines += ["", "## Pairwise differences (second − first, points; 95% paired bootstrap over "
              f"utterances and seeds, {s.bootstrap_samples} replicates; * = significant)", ""]  # fmt: skip
    for metric in ("wer", "cer"):
        lines += [f"### {metric.upper()}", "",
                  "| pair | " + " | ".join([*names, "test-set mean"]) + " |",
                  "| --- |" + " ---: |" * (len(names) + 1)]  # fmt: skip
        for p in data["pairs"]:
            if p["metric"] == metric:
                cells = [_iv(p["intervals"][n]) for n in [*names, "mean"]]
                lines.append(f"| `{p['b']}` − `{p['a']}` | " + " | ".join(cells) + " |")
        lines.append("")
    trained = [r["seconds"] for r in records.values()]
    lines += ["## Run time", "",
              f"{len(records)} trainings, {sum(trained):.0f} s of training in all "
              f"({min(trained):.0f}–{max(trained):.0f} s each, {s.parallel} at a time); "
              + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".", ""]  # fmt: skip
    path = s.out / f"STUDY-{tag(s)}.md"
    path.write_text("\n".join(lines))
    return path
