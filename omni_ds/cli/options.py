"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides`` for ``load_config``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a YAML key, e.g. --set train.max_steps=100 (repeatable)",
    )


def test_set(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path): the one form every command takes a test set in."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH, e.g. dev=data/dev")
    return name, path


def add_test_set_argument(
    parser: argparse.ArgumentParser, *, repeatable: bool, required: bool = True
) -> None:
    """``--test-set NAME=PATH`` (repeatable for commands that score several sets)."""
    parser.add_argument(
        "--test-set",
        type=test_set,
        action="append" if repeatable else "store",
        required=required,
        metavar="NAME=PATH",
        help="a test set: its name in the reports, and a shard dir, .tar shard, brace pattern, "
        "glob (or these as s3:// / https:// URLs), JSONL manifest, Kaldi dir or LibriSpeech tree"
        + (" (repeatable)" if repeatable else ""),
    )
