"""Word and character error rates of exported models on named test sets, with significance.

Each test set is NAME=PATH: a shard directory (with or without index.json), a .tar shard, or a
corpus make-shards reads (NeMo JSONL manifest, Kaldi dir, LibriSpeech tree), read in order and
unfiltered by ``data_pipeline.ordered``; an unusable utterance stops the run, naming it.
References and hypotheses go through a normaliser (--normalizer: omni = ours, documented in
``omni_ds.eval.normalize``; whisper = Whisper's EnglishTextNormalizer; none) before jiwer scores
each set (WER over words, CER over characters). The average is the plain mean over the TEST
sets, as the Omni-router paper reports it: sets named dev* (dev, dev_clean, dev-other) are left
out unless --mean-includes-dev.

Models exported from runs of one recipe with different seeds (the same ``recipe`` in their
metadata) are grouped: mean ± std over the seeds. For every pair of groups, the WER and CER
difference gets a 95% paired bootstrap interval (Bisani & Ney 2004; seeds resampled too), per
set and on the average; * marks a difference whose interval excludes 0. Writes OUT/eval.json,
OUT/eval.csv, OUT/eval.md and OUT/hyps/<model>/<set>.tsv. With several single-run models it also
prints the paper-style relative WER reduction of the LAST model against each other one.

    omni-ds eval models/dense models/switch models/omni \\
        --test-set dev=data/dev --test-set noisy=data/test_noisy --out eval/
"""

from __future__ import annotations

import argparse

from omni_ds.cli.options import add_test_set_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="written by omni-ds export")
    add_test_set_argument(parser, repeatable=True)
    parser.add_argument("--out", default="eval", help="directory for the reports (default: eval)")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=200.0,
        help="audio seconds per decoding batch, padding included (default: 200)",
    )
    parser.add_argument(
        "--beam-size", type=int, default=0, help="CTC prefix beam search width; 0 = greedy"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--normalizer",
        choices=("omni", "whisper", "none"),
        default="omni",
        help="text normaliser applied before scoring (default: omni)",
    )
    parser.add_argument(
        "--mean-includes-dev",
        action="store_true",
        help="average over every set, dev sets included (default: test sets only)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap replicates of the pairwise intervals (default: 1000; 0 = none)",
    )
    parser.add_argument(
        "--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: 0)"
    )
    parser.add_argument(
        "--endpoint-url",
        default="",
        help="endpoint of the S3-compatible store of s3:// sources (default: AWS, or the "
        "environment's / AWS config's); credentials come from the environment or ~/.aws",
    )
    parser.add_argument(
        "--reuse-hyps",
        action="store_true",
        help="score OUT/hyps/<model>/<set>.tsv where it holds every utterance of the set instead "
        "of decoding again (e.g. after evaluating the models one by one in parallel)",
    )


def parse_test_sets(items: list[tuple[str, str]]) -> dict[str, str]:
    sets: dict[str, str] = {}
    for name, path in items:
        if name in sets:
            raise SystemExit(f"--test-set {name!r} is given twice; names must be unique")
        sets[name] = path
    return sets


def model_names(paths: list[str]) -> list[str]:
    """Short names for the tables: the directory names, or the paths if those collide."""
    from pathlib import Path

    names = [Path(p).resolve().name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from data_pipeline.ordered import OrderedReader
    from data_pipeline.remote import Remote
    from omni_ds.ckpt.model_dir import load_model_dir, read_metadata
    from omni_ds.eval.inference import Transcriber, Transcripts, transcribe_batches
    from omni_ds.eval.normalize import get_normalizer
    from omni_ds.eval.report_files import write_all
    from omni_ds.eval.wer import EvalReport, score_utterances

    sets = parse_test_sets(args.test_set)
    if args.bootstrap < 0:
        raise SystemExit(f"--bootstrap {args.bootstrap}: use 0 (no intervals) or e.g. 1000")
    normalize = get_normalizer(args.normalizer)
    # Opened once, before any model loads: a set that cannot be read fails at once.
    remote = Remote(endpoint_url=args.endpoint_url)
    readers = {name: OrderedReader(path, batch_seconds=args.batch_seconds, remote=remote)
               for name, path in sets.items()}  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    mean_sets = list(sets) if args.mean_includes_dev else None
    reports, recipes, seeds = [], [], []
    for model_dir, name in zip(args.models, model_names(args.models)):
        transcriber = None
        report = EvalReport(model=name, sets={}, mean_sets=mean_sets)
        for set_name, reader in readers.items():
            tsv = out / "hyps" / name / f"{set_name}.tsv"
            result = Transcripts.read_tsv(tsv) if args.reuse_hyps and tsv.is_file() else None
            if result is None or len(result.keys) != reader.num_utterances:
                if transcriber is None:
                    transcriber = Transcriber(load_model_dir(model_dir, device), args.beam_size)
                result = transcribe_batches(
                    transcriber, reader, desc=f"{name}/{set_name}", total=reader.num_utterances
                )
                tsv.parent.mkdir(parents=True, exist_ok=True)
                result.write_tsv(tsv)
            score, counts = score_utterances(result.refs, result.hyps, normalize)
            report.sets[set_name], report.utterances[set_name] = score, counts
        reports.append(report)
        metadata = read_metadata(model_dir)
        recipes.append(metadata.get("recipe"))
        seeds.append(metadata.get("seed"))
    text = write_all(reports, recipes, out, args.bootstrap, args.bootstrap_seed, args.normalizer,
                     seeds)  # fmt: skip
    print(text)
    return 0
