"""The ``omni-ds`` command line: one subcommand per workflow.

Each subcommand lives in ``omni_ds/cli/<name>.py`` and provides ``add_arguments(parser)`` and
``run(args) -> int``; its module docstring's first line is its help. Commands are thin: the work
is done by the package the command names (``omni_ds.train``, ``omni_ds.ckpt``, ``omni_ds.eval``,
...). Heavy imports (torch, DeepSpeed) stay inside ``run``: building the parser imports neither,
so ``omni-ds --help`` is quick (``tests/test_cli.py`` checks it).

Launchers may add ``--local_rank=N`` (DeepSpeed's launcher, before the subcommand) or
``--local-rank N`` (older ``torch.distributed.launch``) anywhere; it is taken out of the arguments
and kept as ``LOCAL_RANK`` when the environment lacks it. User errors (a bad config, data or
checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# name on the command line -> module under omni_ds.cli
COMMANDS: dict[str, str] = {
    "env": "env",
    "check-config": "check_config",
    "train": "train",
    "export": "export",
    "ckpt": "ckpt",
    "transcribe": "transcribe",
    "eval": "eval",
    "analyze": "analyze",
    "synth": "synth",
    "make-shards": "make_shards",
    "train-tokenizer": "train_tokenizer",
    "submit": "submit",
    "demo": "demo",
    "study": "study",
}

_LOCAL_RANK = re.compile(r"--local[_-]rank(=(?P<value>.*))?")


class PlainHelp(argparse.RawDescriptionHelpFormatter):
    """Help as plain text: the docstrings' RST literal quotes (double backticks) removed, and
    required options marked as such."""

    def format_help(self) -> str:
        return super().format_help().replace("``", "")

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings and "(required)" not in text:
            text = f"{text} (required)" if text else "(required)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from omni_ds import __version__

    parser = argparse.ArgumentParser(
        prog="omni-ds",
        description="Train and evaluate Omni-router MoE CTC speech recognisers with DeepSpeed.",
        formatter_class=PlainHelp,
    )
    parser.add_argument("--version", action="version", version=f"omni-ds {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"omni_ds.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        help_line = doc.splitlines()[0].replace("``", "") if doc else ""
        p = sub.add_parser(name, help=help_line, description=doc, formatter_class=PlainHelp)
        module.add_arguments(p)
        _plain_help_everywhere(p)
        p.set_defaults(_run=module.run)
    return parser


def _plain_help_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give a command's own sub-subcommands (``ckpt reshard``) the same help format, and a
    help line to required options that have none (argparse would list them bare)."""
    for action in parser._actions:
        if action.required and action.option_strings and not action.help:
            action.help = "(required)"
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = PlainHelp
                _plain_help_everywhere(child)


def take_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without any ``--local_rank``/``--local-rank`` launcher argument (its value goes
    to ``LOCAL_RANK`` if unset: DeepSpeed's launcher also exports it)."""
    out, i = [], 0
    while i < len(argv):
        match = _LOCAL_RANK.fullmatch(argv[i])
        if match is None:
            out.append(argv[i])
            i += 1
            continue
        value = match["value"]
        if value is None and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        i += 1
        if value is None or not value.isdigit():
            raise SystemExit(f"omni-ds: error: {argv[i - 1]}: expected --local_rank=N")
        os.environ.setdefault("LOCAL_RANK", value)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = take_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SystemExit as e:  # a command's own one-line refusal, e.g. SystemExit("--out ...")
        if not isinstance(e.code, str):
            raise
        print(f"omni-ds {args.command}: error: {e.code}", file=sys.stderr)
        return 2
    except Exception as e:
        from omni_ds.errors import USER_ERRORS

        if not isinstance(e, USER_ERRORS):
            raise
        print(f"omni-ds {args.command}: error: {e}", file=sys.stderr)
        return 2
