"""Train a SentencePiece tokenizer on the transcripts of shards.

    omni-ds train-tokenizer shards/train --vocab 256 --out shards/tokenizer   # tokenizer.model
    omni-ds train-tokenizer 'wds/shard-{000000..000003}.tar' --vocab 256 --out wds/tokenizer

SHARDS are shard sources as ``data.train`` takes them (directories, .tar files, brace patterns,
globs, or these as ``s3://``/``https://`` URLs; indexed where needed). Transcripts are normalised first (``data_pipeline.text``: NFKC,
lower case, single spaces), as the tokenizer normalises whatever it encodes.

``--vocab`` is an upper bound (a small corpus may support fewer pieces); set the model's
``vocab_size`` to at least the size printed.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARDS", help="shard sources")
    parser.add_argument(
        "--text-key", default="text", help="JSON key of the transcript (default text)"
    )
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
    parser.add_argument(
        "--endpoint-url",
        default="",
        help="endpoint of the S3-compatible store of s3:// sources (default: AWS, or the "
        "environment's / AWS config's); credentials come from the environment or ~/.aws",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipeline.remote import Remote, is_url
    from data_pipeline.sources import SourceError
    from data_pipeline.tokenizer import Tokenizer, train_tokenizer

    if is_url(args.shards[0]) and not args.out:
        raise SystemExit("--out PREFIX is required when the first source is a URL")
    first = Path(args.shards[0])
    prefix = (
        Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "tokenizer"
    )
    try:
        path = train_tokenizer(
            args.shards, prefix, args.vocab, args.model_type, text_key=args.text_key,
            remote=Remote(endpoint_url=args.endpoint_url),
        )  # fmt: skip
    except (SourceError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(f"{path}: {Tokenizer(path).vocab_size} pieces")
    return 0
