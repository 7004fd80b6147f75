"""Check an experiment for the job's world size, then submit slurm/train.sbatch; prints the job id.

    omni-ds submit configs/omni_8x84m.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00 \\
        --partition gpu --account asr --set train.run_dir=runs/omni
    omni-ds submit configs/tiny.yaml --nodes 2 --dry-run     # print the sbatch command only

The world size is nodes × tasks per node (one process per GPU). Config problems are listed as
``omni-ds check-config`` lists them and nothing is submitted (exit 2). The job's log goes to
RUN_DIR/slurm-<jobid>.out, appended to across requeues; the job checkpoints and requeues itself
``--checkpoint-before`` seconds before its time limit or when preempted (see slurm/train.sbatch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_ds.cli.options import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="experiment YAML, e.g. configs/tiny.yaml, or a shipped preset name"
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node, one process each (default 0: a CPU-only cluster)",
    )
    parser.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="processes per node (default: --gpus-per-node, or 1 without GPUs)",
    )
    parser.add_argument("--cpus-per-task", type=int, default=None, help="cores per process")
    parser.add_argument(
        "--time", default=None, help="time limit, e.g. 2-00:00:00 (default: the partition's)"
    )
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account to charge")
    parser.add_argument("--job-name", default=None, help="default: omni-ds-<run dir name>")
    parser.add_argument(
        "--checkpoint-before",
        type=int,
        default=None,
        metavar="SECONDS",
        help="checkpoint and requeue this long before the time limit (default 300)",
    )
    add_overrides_argument(parser)
    parser.add_argument(
        "--sbatch-arg",
        dest="sbatch_args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)",
    )
    parser.add_argument(
        "--script",
        default="train.sbatch",
        help="batch script to submit: a path, or a shipped script's name (default train.sbatch)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command only")


def sbatch_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``sbatch`` command line for ``args``; the job's log goes into ``run_dir``."""
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    argv = ["sbatch", "--parsable", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}"]
    if args.gpus_per_node:
        argv.append(f"--gpus-per-node={args.gpus_per_node}")
    options = {
        "cpus-per-task": args.cpus_per_task,
        "time": args.time,
        "partition": args.partition,
        "account": args.account,
    }
    argv += [f"--{key}={value}" for key, value in options.items() if value is not None]
    argv.append(f"--job-name={args.job_name or f'omni-ds-{run_dir.resolve().name}'}")
    if args.checkpoint_before is not None:
        argv.append(f"--signal=B:USR1@{args.checkpoint_before}")
    argv.append(f"--output={run_dir.resolve() / 'slurm-%j.out'}")
    argv += args.sbatch_args
    argv += [str(args.script), str(args.config)]
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def run(args: argparse.Namespace) -> int:
    import os
    import shlex
    import shutil
    import subprocess
    import sys

    from omni_ds.config import presets
    from omni_ds.config.checks import preflight

    tasks = args.tasks_per_node or args.gpus_per_node or 1
    world_size = args.nodes * tasks
    device = "cuda" if args.gpus_per_node else "cpu"  # the job's nodes, not this login node
    result = preflight(args.config, args.overrides, world_size, device)
    cfg, problems = result.cfg, result.problems
    for w in result.warnings:
        print(f"  warning: {w}", file=sys.stderr)
    if problems:
        print(f"{args.config}: {len(problems)} problem(s) for world size {world_size}; "
              "nothing submitted:", file=sys.stderr)  # fmt: skip
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    args.script = presets.find(args.script, "slurm").resolve()
    if not args.script.is_file():
        print(f"--script {args.script}: no such file; pass a path or one of "
              f"{', '.join(presets.names('slurm'))}", file=sys.stderr)  # fmt: skip
        return 2
    # A preset named by name: hand the job the file the checks read (a path stays as given; the
    # job starts in this directory).
    args.config = presets.find(args.config, "configs")
    run_dir = Path(cfg.train.run_dir)
    argv = sbatch_command(args, run_dir)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    if shutil.which("sbatch") is None:
        print("sbatch not found: submit from a SLURM login node (or --dry-run)", file=sys.stderr)
        return 1
    env = dict(os.environ)
    # The job runs the omni-ds of the environment it was submitted from.
    omni_ds = Path(sys.executable).with_name("omni-ds")
    if "OMNI_DS" not in env and omni_ds.is_file():
        env["OMNI_DS"] = str(omni_ds)
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"sbatch failed ({result.returncode}): {result.stderr.strip()}\n  command: "
              f"{shlex.join(argv)}", file=sys.stderr)  # fmt: skip
        return 1
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted: {shlex.join(argv)}\n  log: {run_dir.resolve()}/slurm-{job_id}.out",
          file=sys.stderr)  # fmt: skip
    print(job_id)
    return 0
