"""Train a SentencePiece tokenizer on the transcripts of shard directories.

    omni-ds train-tokenizer shards/train --vocab 256 --out shards/tokenizer   # tokenizer.model

``--vocab`` is an upper bound (a small corpus may support fewer pieces); set the model's
``vocab_size`` to at least the size printed.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARDS", help="shard directories")
    parser.add_argument("--vocab", type=int, required=True, help="vocabulary size (upper bound)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="PREFIX",
        help="writes PREFIX.model and PREFIX.vocab (default: SHARDS[0]/tokenizer)",
    )
    parser.add_argument(
        "--model-type",
        choices=("unigram", "bpe", "char", "word"),
        default="unigram",
        help="SentencePiece algorithm (default: unigram)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipeline.tokenizer import Tokenizer, train_tokenizer

    prefix = Path(args.out) if args.out else Path(args.shards[0]) / "tokenizer"
    path = train_tokenizer([Path(s) for s in args.shards], prefix, args.vocab, args.model_type)
    print(f"{path}: {Tokenizer(path).vocab_size} pieces")
    return 0
