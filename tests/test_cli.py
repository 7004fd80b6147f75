"""The omni-ds command line itself: --version, a parser that imports no torch, plain help,
required options marked, launcher arguments, one-line user errors with exit 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from harness import child_pythonpath

from omni_ds import __version__
from omni_ds.cli import build_parser, main, take_local_rank


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand, and every sub-subcommand as ``"ckpt reshard"``."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return found


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"omni-ds {__version__}"


def test_package_and_parser_import_neither_torch_nor_deepspeed():
    code = (
        "import sys, omni_ds, omni_ds.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = child_pythonpath()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_is_plain_text_and_marks_required_options(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside a help text
    parser = build_parser()
    assert "``" not in parser.format_help()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert "``" not in text, name
        for action in sub._actions:
            if action.required and action.option_strings:
                options = text[text.index("\noptions:") :]
                start = options.index(f"\n  {action.option_strings[0]}")
                end = options.find("\n  -", start + 1)
                assert "(required)" in options[start:end], (name, action.option_strings)
    shards_help = " ".join(_subparsers(parser)["make-shards"].format_help().split())
    assert "--out DIR shard directory to write (required unless --index-only)" in shards_help


def test_eval_and_analyze_take_test_sets_in_one_form(capsys):
    subs = _subparsers(build_parser())
    for name in ("eval", "analyze"):
        assert "--test-set NAME=PATH" in subs[name].format_help(), name
        with pytest.raises(SystemExit) as e:
            main([name, "models/x", "--test-set", "data/dev"])
        assert e.value.code == 2
        assert "'data/dev': expected NAME=PATH" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--local_rank=1", "env"],
        ["env", "--local-rank", "1"],
        ["env", "--local_rank", "1"],
        ["--local-rank=1", "env"],
    ],
)
def test_launcher_local_rank_is_taken_anywhere(argv, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert take_local_rank(argv) == ["env"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    # a command's own refusal
    assert main(["make-shards", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "omni-ds make-shards: error: --out DIR is required (unless --index-only)\n"
    # a CheckpointError from the package doing the work
    assert main(["ckpt", "inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omni-ds ckpt: error: ") and err.count("\n") == 1, err
