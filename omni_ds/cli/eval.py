"""Word error rate of one or more exported models on named test sets.

Each test set is NAME=PATH: a shard directory (with or without index.json), a .tar shard, or a
corpus make-shards reads (NeMo JSONL manifest, Kaldi dir, LibriSpeech tree), read in order and
unfiltered by ``data_pipeline.ordered``; an unusable utterance stops the run, naming it.
References and hypotheses go through the English normaliser of ``omni_ds.eval.normalize`` (case,
punctuation, whitespace; documented there) before jiwer scores each set; the average is the plain
mean over sets, as the Omni-router paper reports it. Writes OUT/eval.json, OUT/eval.csv, OUT/eval.md and
OUT/hyps/<model>/<set>.tsv. With several models (e.g. dense, Switch, omni) it prints the paper-style
comparison: the relative WER reduction of the LAST model against each other one, per set and on
the average.

    omni-ds eval models/dense models/switch models/omni \\
        --test-set dev=data/dev --test-set noisy=data/test_noisy --out eval/
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="written by omni-ds export")
    parser.add_argument(
        "--test-set",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a test set (repeatable): shard dir, .tar shard, JSONL manifest, Kaldi dir or "
        "LibriSpeech tree",
    )
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


def parse_test_sets(items: list[str]) -> dict[str, str]:
    sets: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--test-set {item!r}: expected NAME=PATH, e.g. dev=data/dev")
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
    from omni_ds.ckpt.model_dir import load_model_dir
    from omni_ds.eval.compare import comparison_markdown
    from omni_ds.eval.inference import Transcriber, transcribe_batches
    from omni_ds.eval.wer import EvalReport, markdown_table, score_set, write_csv, write_json

    sets = parse_test_sets(args.test_set)
    # Opened once, before any model loads: a set that cannot be read fails at once.
    readers = {name: OrderedReader(path, batch_seconds=args.batch_seconds)
               for name, path in sets.items()}  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    reports = []
    for model_dir, name in zip(args.models, model_names(args.models)):
        loaded = load_model_dir(model_dir, device)
        transcriber = Transcriber(loaded, beam_size=args.beam_size)
        scores = {}
        for set_name, reader in readers.items():
            result = transcribe_batches(
                transcriber, reader, desc=f"{name}/{set_name}", total=reader.num_utterances
            )
            (out / "hyps" / name).mkdir(parents=True, exist_ok=True)
            result.write_tsv(out / "hyps" / name / f"{set_name}.tsv")
            scores[set_name] = score_set(result.refs, result.hyps)
        reports.append(EvalReport(model=name, sets=scores))
    write_json(reports, out / "eval.json")
    write_csv(reports, out / "eval.csv")
    tables = [markdown_table(r) for r in reports]
    if len(reports) > 1:
        tables.append(comparison_markdown(reports))
    text = "\n".join(tables)
    (out / "eval.md").write_text(text)
    print(text)
    return 0
