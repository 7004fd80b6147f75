"""Write WebDataset tar shards (16 kHz FLAC + JSON labels) and their index from a corpus.

INPUT is a NeMo-style JSONL manifest (``audio_filepath``, ``text``, ``duration``, optional
``offset``; other fields such as ``pl_confidence``/``pl_teacher`` are kept), a LibriSpeech tree
(``*.trans.txt`` + FLAC) or a Kaldi data dir (``wav.scp``, ``text``, optional ``segments`` and
``utt2spk``). Output is deterministic; a rerun skips shards already written; inputs that cannot be
read are listed in ``OUT/report.jsonl``. With ``--tasks N`` (an array job, as
``slurm/make_shards.sbatch`` runs it) task ``--task I`` writes every N-th shard and the last task
to finish writes the index: the output is byte-identical to the one-machine command.

    omni-ds make-shards train.jsonl --out shards/train --shard-size 1000
    omni-ds make-shards train.jsonl --out shards/train --task 0 --tasks 8   # task 0 of 8
    omni-ds make-shards LibriSpeech/train-clean-100 --out shards/ls100 --shard-bytes 512M
    omni-ds make-shards data/kaldi/train --out shards/kaldi
    omni-ds make-shards shards/foreign --index-only     # index shards written by other tools
"""

from __future__ import annotations

import argparse
import os

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """``512M`` -> bytes."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 2G") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="manifest, LibriSpeech tree or Kaldi dir")
    parser.add_argument("--out", metavar="DIR", help="shard directory to write")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=None, help="utterances per shard (1000)")
    size.add_argument(
        "--shard-bytes",
        type=byte_size,
        default=None,
        help="target shard size (raw 16-bit PCM bytes, e.g. 512M; FLAC comes out ~half)",
    )
    env = os.environ
    cpus = env.get("SLURM_CPUS_PER_TASK")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(cpus) if cpus else None,
        help="processes (default: SLURM_CPUS_PER_TASK, else all cores)",
    )
    parser.add_argument(
        "--task",
        type=int,
        default=int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)),
        help="this array task's number, 0-based (default: from SLURM_ARRAY_TASK_ID)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=int(env.get("SLURM_ARRAY_TASK_COUNT", 1)),
        help="tasks in the array (default: SLURM_ARRAY_TASK_COUNT, else 1: no array)",
    )
    parser.add_argument(
        "--job",
        default=env.get("SLURM_ARRAY_JOB_ID", "local"),
        help="names this array run's completion markers (default: SLURM_ARRAY_JOB_ID)",
    )
    parser.add_argument(
        "--index-only",
        action="store_true",
        help="INPUT is a directory of existing *.tar shards: only write its index.json",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipeline.index import index_directory, load_index

    if args.index_only:
        path = index_directory(Path(args.input), progress=True)
        shards = load_index(path.parent)
        bad = sum(len(s["bad"]) for s in shards.shards)
        print(f"{path}: {len(shards.shards)} shards, {shards.num_samples} samples "
              f"({shards.duration / 3600:.2f} h), {bad} unusable")  # fmt: skip
        return 0
    if not args.out:
        raise SystemExit("--out DIR is required (unless --index-only)")
    if not 0 <= args.task < args.tasks:
        raise SystemExit(
            f"--task {args.task} is not in 0..{args.tasks - 1}; use --array=0-{args.tasks - 1}"
        )
    from data_pipeline.manifests import read_input
    from data_pipeline.shards import REPORT_FILE, make_shards, make_shards_task

    records, problems = read_input(args.input)
    layout = dict(
        problems=problems,
        shard_size=args.shard_size if args.shard_bytes is None else None,
        shard_bytes=args.shard_bytes,
    )
    if args.tasks > 1:
        finished = make_shards_task(records, Path(args.out), args.task, args.tasks, job=args.job,
                                    workers=args.workers or 1, **layout)  # fmt: skip
        what = "all tasks done, index written" if finished else "waiting for the other tasks"
        print(f"{args.out}: task {args.task} of {args.tasks} done; {what}")
        return 0
    summary = make_shards(records, Path(args.out), workers=args.workers, **layout)
    print(
        f"{summary.out}: {summary.shards} shards ({summary.written} written now), "
        f"{summary.samples} utterances, {summary.hours:.2f} h; "
        f"{summary.problems} inputs left out (see {summary.out / REPORT_FILE})"
    )
    return 0
