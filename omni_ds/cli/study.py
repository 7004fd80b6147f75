"""Run the router study: dense / Switch / omni at several depths x seeds, LRs swept per family.

Settings come from one YAML (``configs/study.yaml``, fixed before the runs): the corpus, routers,
depths, seeds, the LR sweep and the steps. The sweep trains every (router, depth) once per LR and
keeps the LR with the lowest final full-dev WER; the remaining seeds train at that LR. Finished
trainings are reused by the next invocation (``OUT/stages/``), so the command can be rerun.

Then every comparison run is exported, ``omni-ds eval`` scores them all (WER, CER, mean ± std
over seeds, paired bootstrap intervals of every pair) and ``omni-ds analyze`` measures each MoE
run's cross-layer NMI and random-routing ablation; OUT/STUDY-L4-L8.md holds the tables.

    nice -n 19 omni-ds study configs/study.yaml                # everything
    nice -n 19 omni-ds study configs/study.yaml --train-only   # the trainings only
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", metavar="STUDY.yaml", help="e.g. configs/study.yaml")
    parser.add_argument(
        "--train-only", action="store_true", help="stop after the trainings (sweep and seeds)"
    )
    parser.add_argument(
        "--depth",
        type=int,
        action="append",
        metavar="N",
        help="only these of the settings' depths (repeatable; default: all); the report says so",
    )


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from omni_ds.demo.stages import StageFailed
    from omni_ds.demo.study import load_settings, run_training
    from omni_ds.demo.study_report import evaluate, write_report

    start = time.perf_counter()
    settings = load_settings(args.settings)
    if args.depth:
        unknown = sorted(set(args.depth) - set(settings.depths))
        if unknown:
            raise SystemExit(f"--depth {unknown}: not in the settings' depths {settings.depths}")
        settings.depths = [d for d in settings.depths if d in args.depth]
    try:
        chosen, runs, records = run_training(settings)
        trained = sum(r["seconds"] for r in records.values() if not r["reused"])
        print(f"study: {len(records)} trainings ({trained:.0f} s of training run now) "
              f"after {time.perf_counter() - start:.0f} s")  # fmt: skip
        if args.train_only:
            return 0
        seconds = evaluate(settings, runs)
        path = write_report(settings, Path(args.settings), chosen, runs, records, seconds)
    except StageFailed as e:
        print(f"study: {e}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"study: finished in {time.perf_counter() - start:.0f} s; report: {path}")
    return 0
