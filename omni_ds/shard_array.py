"""One task of a sharding array job (``slurm/make_shards.sbatch``): a slice of the shards.

    python -m omni_ds.shard_array INPUT --out DIR --task I --tasks N [--shard-size S]

The shard layout is fixed from the whole input's record order (as ``omni-ds make-shards`` fixes
it), so task I of N writes shards I, I+N, I+2N, ... and the union is exactly the local command's
output. The task that finds all N tasks done (under a file lock) finishes with the local command's
own code, which only scans the shards now on disk and writes ``index.json`` and
``report.jsonl``: the result is byte-identical to ``omni-ds make-shards INPUT --out DIR``. A
requeued or rerun task skips the shards that are already complete.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

from data_pipeline.manifests import read_input

# The shard builder and its per-shard problem-list directory are make_shards' own: a task must
# write exactly what the local command writes.
from data_pipeline.shards import (
    _PARTS,
    _build_shard,
    group_records,
    make_shards,
    run_jobs,
    shard_name,
)

DONE_DIR = ".array"
"""Per-task completion markers, ``DIR/.array/<job>.<task>-of-<tasks>``: a later array job over
the same directory waits for its own tasks, not for markers left by an earlier one."""


def run_task(
    input_path: str,
    out: Path,
    task: int,
    tasks: int,
    *,
    job: str = "local",
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 1,
) -> bool:
    """Write task ``task``'s shards; returns True when this call also wrote the index."""
    records, problems = read_input(input_path)
    groups = group_records(records, shard_size, shard_bytes)
    jobs = [(out / shard_name(i), g) for i, g in enumerate(groups)]
    out.mkdir(parents=True, exist_ok=True)
    (out / _PARTS).mkdir(exist_ok=True)
    done = out / DONE_DIR
    done.mkdir(exist_ok=True)
    run_jobs(_build_shard, jobs[task::tasks], workers, f"task {task}/{tasks}", progress=True)
    (done / f"{job}.{task}-of-{tasks}").touch()
    with open(done / "lock", "w") as lock:
        # Both tasks may finish together: one writes the index, the other then finds it written
        # and rewrites the same bytes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((done / f"{job}.{t}-of-{tasks}").exists() for t in range(tasks)):
            return False
        make_shards(records, out, problems=problems, shard_size=shard_size,
                    shard_bytes=shard_bytes, workers=workers, progress=False)  # fmt: skip
    return True


def main(argv: list[str] | None = None) -> int:
    from omni_ds.cli.make_shards import byte_size

    parser = argparse.ArgumentParser(prog="python -m omni_ds.shard_array", description=__doc__)
    parser.add_argument("input", metavar="INPUT", help="manifest, LibriSpeech tree or Kaldi dir")
    parser.add_argument("--out", required=True, metavar="DIR", help="shard directory to write")
    parser.add_argument("--shard-size", type=int, default=None, help="utterances per shard")
    parser.add_argument("--shard-bytes", type=byte_size, default=None, help="e.g. 512M")
    env = os.environ
    parser.add_argument(
        "--task",
        type=int,
        default=int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)),
        help="this task's number, 0-based (default: from SLURM_ARRAY_TASK_ID)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=int(env.get("SLURM_ARRAY_TASK_COUNT", 1)),
        help="tasks in the array (default: SLURM_ARRAY_TASK_COUNT)",
    )
    parser.add_argument(
        "--job",
        default=env.get("SLURM_ARRAY_JOB_ID", "local"),
        help="names this run's completion markers (default: SLURM_ARRAY_JOB_ID)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env.get("SLURM_CPUS_PER_TASK", 1)),
        help="processes (default: SLURM_CPUS_PER_TASK or 1)",
    )
    args = parser.parse_args(argv)
    if args.shard_size is not None and args.shard_bytes is not None:
        parser.error("give --shard-size or --shard-bytes, not both")
    if not 0 <= args.task < args.tasks:
        parser.error(
            f"--task {args.task} is not in 0..{args.tasks - 1}; use --array=0-{args.tasks - 1}"
        )
    finished = run_task(args.input, Path(args.out), args.task, args.tasks, job=args.job,
                        shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                        workers=args.workers)  # fmt: skip
    what = "all tasks done, index written" if finished else "waiting for the other tasks"
    print(f"{args.out}: task {args.task} of {args.tasks} done; {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
