"""Run the router study: dense / Switch / omni at several depths x seeds, LRs swept per family.

Settings come from one YAML (``configs/study.yaml``, fixed before the runs): the corpus, routers,
depths, seeds, the LR sweep and the steps. The sweep trains every (router, depth) once per LR and
keeps the LR with the lowest final full-dev WER; the remaining seeds train at that LR. Finished
trainings are reused by the next invocation (``OUT/stages/``), so the command can be rerun.

    nice -n 19 omni-ds study configs/study.yaml --train-only   # the trainings only
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", metavar="STUDY.yaml", help="e.g. configs/study.yaml")
    parser.add_argument(
        "--train-only", action="store_true", help="stop after the trainings (sweep and seeds)"
    )


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from omni_ds.demo.stages import StageFailed
    from omni_ds.demo.study import load_settings, run_training

    start = time.perf_counter()
    settings = load_settings(args.settings)
    try:
        chosen, runs, records = run_training(settings)
    except StageFailed as e:
        print(f"study: {e}", file=sys.stderr)
        return 1
    trained = sum(r["seconds"] for r in records.values() if not r["reused"])
    print(f"study: {len(records)} trainings ({trained:.0f} s of training run now) "
          f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
    return 0
