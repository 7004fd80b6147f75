"""Write WebDataset tar shards (16 kHz FLAC + JSON labels) and their index from a corpus.

INPUT is a NeMo-style JSONL manifest (``audio_filepath``, ``text``, ``duration``, optional
``offset`` and ``channel``; other fields such as ``pl_confidence``/``pl_teacher`` are kept), a NeMo
tarred dataset (the directory of ``tarred_audio_manifest.json`` and ``audio_N.tar``), a Lhotse
CutSet (``cuts.jsonl.gz``), a LibriSpeech tree (``*.trans.txt`` + FLAC) or a Kaldi data dir
(``wav.scp``, ``text``, optional ``segments`` and ``utt2spk``); see docs/data.md. Output is
deterministic; a rerun skips shards already written; inputs that cannot be read are listed in
``OUT/report.jsonl``, and a run that keeps no utterance exits 1. With ``--tasks N`` (an array job, as
``slurm/make_shards.sbatch`` runs it) task ``--task I`` writes every N-th shard and the last task
to finish writes the index: the output is byte-identical to the one-machine command.

    omni-ds make-shards train.jsonl --out shards/train --shard-size 1000
    omni-ds make-shards train.jsonl --out shards/train --task 0 --tasks 8   # task 0 of 8
    omni-ds make-shards LibriSpeech/train-clean-100 --out shards/ls100 --shard-bytes 512M
    omni-ds make-shards data/kaldi/train --out shards/kaldi
    omni-ds make-shards nemo_tarred/ --out shards/nemo       # audio_N.tar + tarred manifest
    omni-ds make-shards cuts.jsonl.gz --out shards/lhotse --channel 0
    omni-ds make-shards train.jsonl --out s3://bucket/corpus/train   # uploaded shard by shard
    omni-ds make-shards 'shards/foreign/shard-{000000..000003}.tar' --index-only
    omni-ds make-shards 's3://bucket/wds/shard-{000000..000099}.tar' --index-only  # into the cache
"""

from __future__ import annotations

import argparse
import os
import sys

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """``512M`` -> bytes."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 2G") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="NeMo manifest or tarred dir, Lhotse cuts, LibriSpeech tree, Kaldi dir; with "
        "--index-only a shard source (directory, .tar, brace pattern, glob)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="shard directory to write (required unless --index-only), or a URL to upload the "
        "shards to (s3://bucket/prefix)",
    )
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
        "--channel",
        default=None,
        metavar="N|mix",
        help="channel of multi-channel audio where the input does not say (0-based, or mix); "
        "default: mono as is, channels mixed only when they carry the same signal",
    )
    parser.add_argument(
        "--index-only",
        action="store_true",
        help="INPUT names existing *.tar shards: only write their index",
    )
    parser.add_argument(
        "--text-key",
        default="text",
        help="with --index-only: JSON key of the transcript in <key>.json labels (default text)",
    )
    parser.add_argument(
        "--endpoint-url",
        default="",
        help="endpoint of the S3-compatible store of s3:// sources and --out (default: AWS, or "
        "the environment's / AWS config's); credentials come from the environment or ~/.aws",
    )


def _channel(text: str | None):
    if text is None or text == "mix":
        return text
    if text.isdigit():
        return int(text)
    raise SystemExit(f"--channel {text!r}: use a 0-based channel number or mix")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.index_only:
        return _index_only(args.input, args.text_key, args.endpoint_url)
    if not args.out:
        raise SystemExit("--out DIR is required (unless --index-only)")
    if not 0 <= args.task < args.tasks:
        raise SystemExit(
            f"--task {args.task} is not in 0..{args.tasks - 1}; use --array=0-{args.tasks - 1}"
        )
    from data_pipeline.manifests import read_input
    from data_pipeline.remote import Remote, is_url, join, redact
    from data_pipeline.shards import REPORT_FILE, make_shards, make_shards_task

    remote = Remote(endpoint_url=args.endpoint_url)
    if is_url(args.out):
        _check_url_out(args, remote)
    channel = _channel(args.channel)
    try:
        records, problems = read_input(args.input)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    for r in records:
        r.channel = channel if r.channel is None else r.channel
    layout = dict(
        problems=problems,
        shard_size=args.shard_size if args.shard_bytes is None else None,
        shard_bytes=args.shard_bytes,
    )
    if is_url(args.out):
        from data_pipeline.upload import upload_shards

        try:
            summary = upload_shards(records, args.out, remote, workers=args.workers, **layout)
        except FileNotFoundError as e:  # a permanent storage failure, named by its URL
            raise SystemExit(f"{e}; no index was written") from None
        where, report = redact(summary.out), redact(join(summary.out, REPORT_FILE))
    elif args.tasks > 1:
        finished = make_shards_task(records, Path(args.out), args.task, args.tasks, job=args.job,
                                    workers=args.workers or 1, **layout)  # fmt: skip
        what = "all tasks done, index written" if finished else "waiting for the other tasks"
        print(f"{args.out}: task {args.task} of {args.tasks} done; {what}")
        return 0
    else:
        summary = make_shards(records, Path(args.out), workers=args.workers, **layout)
        where, report = summary.out, summary.out / REPORT_FILE
    print(
        f"{where}: {summary.shards} shards ({summary.written} written now), "
        f"{summary.samples} utterances, {summary.hours:.2f} h; "
        f"{summary.problems} inputs left out (see {report})"
    )
    if summary.samples == 0:
        print(f"error: no utterance of {args.input} was usable; the reasons are in {report}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _check_url_out(args: argparse.Namespace, remote) -> None:
    """Refuse an ``--out`` URL that cannot take the shards before the input is read."""
    from data_pipeline.remote import redact
    from data_pipeline.upload import check_writable

    if args.tasks > 1:
        raise SystemExit(f"--out {redact(args.out)}: array tasks (--tasks {args.tasks}) meet "
                         "through a shared directory; give --out a directory on shared disk, or "
                         "run one task with more --workers")  # fmt: skip
    try:
        check_writable(args.out, remote)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{e}; nothing was written") from None


def _index_only(spec: str, text_key: str, endpoint_url: str = "") -> int:
    """Index existing shards; exit 1 when they hold no usable sample."""
    from collections import Counter

    from data_pipeline.remote import Remote
    from data_pipeline.sources import SourceError, index_location, open_shards

    remote = Remote(endpoint_url=endpoint_url)
    try:
        shards = open_shards(spec, text_key, rebuild=True, remote=remote)
    except SourceError as e:
        raise SystemExit(str(e)) from None
    bad = Counter(reason for s in shards.shards for _, reason in s["bad"])
    print(f"{index_location(spec, text_key, remote=remote)}: {len(shards.shards)} shards, "
          f"{shards.num_samples} samples ({shards.duration / 3600:.2f} h), "
          f"{sum(bad.values())} unusable {dict(bad) or ''}")  # fmt: skip
    if shards.num_samples == 0:
        print(f"error: {spec} holds no usable sample; a sample is <key>.<audio> with "
              f"<key>.json (transcript under {text_key!r}, see --text-key) or <key>.txt",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
