"""Run the end-to-end demo on the embedded corpus: data, three trainings, eval, routing, report.

Synthesizes the corpus (FLAC shards, index, tokenizer), trains the tiny dense, Switch and omni
models with DeepSpeed for the same number of steps (2 processes, ep_size=2 for the MoE models),
--seeds times each, exports them, scores WER and CER on dev and four shifted test sets (mean ±
std over seeds, paired bootstrap intervals), analyses Switch's and omni's routing, prints the
comparison table and writes OUT/REPORT.md with the plots. A second run reuses every
finished stage (OUT/stages/*.json); ``--force`` reruns all.

    omni-ds demo                       # what `make demo` runs; ~8 min on 2 CPU cores
    omni-ds demo --steps 20 --train-utterances 240 --out runs/demo_small
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument(
        "--steps",
        type=int,
        default=250,
        help="optimizer steps per model (default: 250; at most the scheduler's total_num_steps "
        "in ds_configs/demo_cpu.json)",
    )
    parser.add_argument(
        "--train-utterances",
        type=int,
        default=2400,
        help="training utterances of the corpus (default: 2400)",
    )
    parser.add_argument(
        "--nproc", type=int, default=2, help="training processes = ep_size of the MoE models"
    )
    parser.add_argument(
        "--config", default="configs/demo.yaml", help="experiment YAML (default: configs/demo.yaml)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="trainings per router (seeds 0, 1, ...); eval groups them into mean ± std "
        "(default: 1, to fit the 10-minute budget; 2 takes ~550 s on 2 cores)",
    )
    parser.add_argument("--force", action="store_true", help="rerun every stage")


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from omni_ds.demo.report import write_report
    from omni_ds.demo.stages import DemoSettings, StageFailed, run_demo

    start = time.perf_counter()
    settings = DemoSettings(
        out=Path(args.out),
        steps=args.steps,
        train_utterances=args.train_utterances,
        nproc=args.nproc,
        config=Path(args.config),
        seeds=args.seeds,
    )
    try:
        times = run_demo(settings, force=args.force)
    except StageFailed as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    line = (
        f"Corpus: {args.train_utterances} synthetic training utterances; models: `{args.config}` "
        f"with router dense / switch / omni, {args.seeds} seed(s) each, {args.steps} steps each "
        f"on {args.nproc} processes (ep_size {args.nproc} for the MoE models)."
    )
    path, table = write_report(settings.out, line, times, seeds=args.seeds)
    print("\n" + table)
    print(f"demo: finished in {time.perf_counter() - start:.0f} s; report: {path}")
    return 0
