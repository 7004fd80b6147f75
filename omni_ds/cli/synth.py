"""Generate the embedded speech-like corpus: shards for train/dev/test, shifted test sets, tokenizer.

Procedurally generated letters-as-formant-segments speech (see ``data_pipeline.synth``): a tiny
model learns it in minutes on a CPU. Train labels are pseudo-labels, a share of them corrupted with
lower ``pl_confidence``; four out-of-domain test sets shift speakers, tempo, noise and bandwidth.

    omni-ds synth data/synth                          # ~3,600 utterances, 18 CPU-s (< 30 s on 2 cores)
    omni-ds synth data/big --train-utterances 20000 --pl-noise 0.3
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="directory for the splits and tokenizer")
    parser.add_argument(
        "--train-utterances",
        type=int,
        default=2400,
        help="training utterances; each held-out set gets 1/12 of it (default: 2400)",
    )
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default: 0)")
    parser.add_argument(
        "--pl-noise",
        type=float,
        default=0.2,
        help="share of training pseudo-labels that are wrong (default: 0.2)",
    )
    parser.add_argument("--shard-size", type=int, default=300, help="utterances per shard")
    parser.add_argument("--vocab", type=int, default=128, help="SentencePiece vocabulary bound")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from data_pipeline.synth import generate

    if not 0 <= args.pl_noise <= 1:
        raise SystemExit(f"--pl-noise: {args.pl_noise} is not a share between 0 and 1")
    start = time.perf_counter()
    counts = generate(
        Path(args.out),
        train_utterances=args.train_utterances,
        seed=args.seed,
        pl_noise=args.pl_noise,
        shard_size=args.shard_size,
        vocab_size=args.vocab,
        workers=args.workers,
    )
    for name, n in counts.items():
        print(f"{args.out}/{name}: {n} utterances")
    print(f"{args.out}/tokenizer.model; done in {time.perf_counter() - start:.1f} s")
    return 0
