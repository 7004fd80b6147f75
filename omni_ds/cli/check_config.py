"""Check an experiment YAML and its DeepSpeed JSON before spending an allocation.

Reports every problem at once, each with its key, value and fix: unknown keys (with a
did-you-mean), batch-size arithmetic for the given world size, ZeRO-3 with MoE, ep_size against
the world size and expert count, precision conflicts, missing files. Exit code 0 when clean, 2
otherwise. ``omni-ds train`` runs the same checks first.
"""

from __future__ import annotations

import argparse

from omni_ds.cli.options import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="number of processes (GPUs) the run will use (default 1)",
    )
    add_overrides_argument(parser)


def run(args: argparse.Namespace) -> int:
    from omni_ds.config.checks import check_experiment

    _, _, problems = check_experiment(args.config, args.overrides, args.world_size)
    if problems:
        print(f"{args.config}: {len(problems)} problem(s) for world size {args.world_size}:")
        for p in problems:
            print(f"  - {p}")
        return 2
    print(f"{args.config}: OK for world size {args.world_size}")
    return 0
