"""Data readiness: what the pre-launch check verifies about ``data:`` before any rank starts.

For every source of ``data.train`` and ``data.dev`` (``data_pipeline.sources``: shard
directories, tars, brace patterns, globs; dev sets also take the corpora ``omni-ds eval`` reads):

* it exists and names shards, and is indexed or indexable: a missing index is built here, where
  ``omni-ds train`` would build it (so the run itself then finds it), as is an automatic one whose
  shards changed since; a user's index whose shards changed since is refused, naming the shard;
* it leaves usable samples after the filters (training sources) or at all (dev sets);
* the tokenizer covers its transcripts: on up to :data:`COVERAGE_SAMPLE` of them, spread over the
  source, the share whose targets hold ``<unk>`` must stay within ``data.max_unk_rate``;

and the tokenizer loads and fits ``model.vocab_size``. Each problem names the key, the source,
the cause and the fix.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from data_pipeline.audio import AudioError
from data_pipeline.index import StaleIndexError
from data_pipeline.loader import no_usable_samples
from data_pipeline.ordered import open_source
from data_pipeline.plan import Catalog, apply_filters
from data_pipeline.reader import BatchReader, SampleReader
from data_pipeline.sources import SourceError, open_shards
from data_pipeline.text import normalize
from data_pipeline.tokenizer import Tokenizer
from omni_ds.config.experiment import ExperimentConfig

COVERAGE_SAMPLE = 200


def _tokenizer(cfg: ExperimentConfig) -> tuple[Tokenizer | None, list[str]]:
    path = Path(cfg.data.tokenizer)
    if not path.is_file():
        return None, []  # the file check reports it
    try:
        tokenizer = Tokenizer(path)
    except (OSError, RuntimeError) as e:
        return None, [
            f"data.tokenizer: {str(path)!r} is not a SentencePiece model ({e}); train one with "
            "`omni-ds train-tokenizer SHARDS --vocab N --out PREFIX`"
        ]
    if tokenizer.vocab_size > cfg.model.vocab_size:
        return tokenizer, [
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
            f"pieces of the tokenizer {str(path)!r}: every rank would fail building the model; "
            f"set model.vocab_size to {tokenizer.vocab_size} (or more)"
        ]
    return tokenizer, []


def coverage_problem(
    key: str, spec: str, reader: SampleReader, ids, tokenizer: Tokenizer, ceiling: float
) -> str | None:
    """The problem of a source whose sampled transcripts the tokenizer maps to ``<unk>``."""
    ids = np.asarray(ids)
    if len(ids) > COVERAGE_SAMPLE:
        ids = ids[np.linspace(0, len(ids) - 1, COVERAGE_SAMPLE).round().astype(int)]
    unk, read, example = 0, 0, None
    for i in ids.tolist():
        try:
            text = reader.transcript(i)
        except AudioError:
            continue  # counted under its own reason when training reads it
        read += 1
        if tokenizer.unk_id in tokenizer.encode(text):
            unk += 1
            example = example or text
    if not read or unk <= ceiling * read:
        return None
    return (
        f"{key}: {spec}: {unk} of {read} sampled transcripts have <unk> in their targets (e.g. "
        f"{example!r} -> {normalize(example)!r} -> {tokenizer.encode(example)[:8]}...), above "
        f"data.max_unk_rate={ceiling}: the tokenizer {str(tokenizer.model_path)!r} was trained "
        f"on other text; train one on these shards (`omni-ds train-tokenizer {spec} --vocab N "
        "--out PREFIX`) and set data.tokenizer and model.vocab_size"
    )


def _train_source(key: str, spec: str, cfg: ExperimentConfig, tokenizer) -> list[str]:
    try:
        shard_set = open_shards(spec, cfg.data.text_key, remote=cfg.data.remote())
    except (SourceError, StaleIndexError) as e:
        return [f"{key}: {e}"]
    catalog = Catalog.from_sets([shard_set])
    kept, reasons = apply_filters(catalog, cfg.data)
    if not len(kept):
        return [f"{key}: {no_usable_samples([spec], reasons)}"]
    if tokenizer is None:
        return []
    reader = BatchReader(catalog)
    try:
        problem = coverage_problem(key, spec, reader, kept, tokenizer, cfg.data.max_unk_rate)
    finally:
        reader.close()
    return [problem] if problem else []


def _dev_source(key: str, spec: str, cfg: ExperimentConfig, tokenizer) -> list[str]:
    try:
        source = open_source(spec, text_key=cfg.data.text_key, remote=cfg.data.remote())
    except (FileNotFoundError, ValueError) as e:
        return [f"{key}: {e}"]
    if not len(source.seconds):
        reasons = dict(Counter(reason for _, _, reason, _ in source.bad))
        return [f"{key}: {spec}: no usable utterance ({reasons or 'the set is empty'}); fix the set "
                "or remove it from data.dev"]  # fmt: skip
    if tokenizer is None:
        return []
    ids = range(len(source.seconds))
    problem = coverage_problem(key, spec, source.reader, ids, tokenizer, cfg.data.max_unk_rate)
    return [problem] if problem else []


def check_data(cfg: ExperimentConfig) -> list[str]:
    """Every data readiness problem of ``cfg`` (module docstring)."""
    tokenizer, problems = _tokenizer(cfg)
    for i, spec in enumerate(cfg.data.train):
        problems += _train_source(f"data.train[{i}]", str(spec), cfg, tokenizer)
    for name, spec in cfg.data.dev.items():
        problems += _dev_source(f"data.dev.{name}", str(spec), cfg, tokenizer)
    return problems
