"""Check an experiment YAML and its DeepSpeed JSON before spending an allocation.

    omni-ds check-config configs/tiny.yaml --world-size 2
    omni-ds check-config omni_8x84m --world-size 16 --device cuda   # a shipped preset, by name

Reports every problem at once, each with its key, value and fix: unknown keys (with a
did-you-mean), "auto" values, batch keys, batch-size arithmetic for the given world size, ZeRO-3
with MoE, model.moe.ep_size against the world size and expert count, precision conflicts, fp16
without a GPU, learning rates PyTorch would refuse, monitors, missing files. Warnings (how a key
is read) are printed too. Exit code 0 when clean, 2 otherwise. ``omni-ds train`` and ``omni-ds
submit`` run exactly these checks first.
"""

from __future__ import annotations

import argparse

from omni_ds.cli.options import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="experiment YAML, e.g. configs/tiny.yaml, or a shipped preset name"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="number of processes (GPUs) the run will use (default 1)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the run's processes will run (default auto: like this host)",
    )
    add_overrides_argument(parser)


def run(args: argparse.Namespace) -> int:
    from omni_ds.config.checks import preflight

    device = None if args.device == "auto" else args.device
    result = preflight(args.config, args.overrides, args.world_size, device)
    for w in result.warnings:
        print(f"  warning: {w}")
    if result.problems:
        print(f"{args.config}: {len(result.problems)} problem(s) for world size {args.world_size}:")
        for p in result.problems:
            print(f"  - {p}")
        return 2
    print(f"{args.config}: OK for world size {args.world_size}")
    return 0
