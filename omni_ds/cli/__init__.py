"""The ``omni-ds`` command line: one subcommand per workflow.

Each subcommand lives in ``omni_ds/cli/<name>.py`` and provides ``add_arguments(parser)`` and
``run(args) -> int``; its module docstring's first line is its help. Commands are thin: the work
is done by the package the command names (``omni_ds.train``, ``omni_ds.ckpt``, ``omni_ds.eval``,
...). Heavy imports stay inside ``run`` so that ``omni-ds --help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni-ds",
        description="Train and evaluate Omni-router MoE CTC speech recognisers with DeepSpeed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"omni_ds.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        help_line = doc.splitlines()[0] if doc else ""
        p = sub.add_parser(
            name,
            help=help_line,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
