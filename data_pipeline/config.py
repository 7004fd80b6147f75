"""The data section of an experiment: where the shards are, what to filter, how to batch.

Plain typed dataclass (``data_pipeline`` never imports ``omni_ds``); ``omni_ds.config.from_dict``
builds it from the ``data:`` section of a YAML file. Bad values raise ``ValueError`` naming the
key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def _fail(key: str, value, fix: str) -> None:
    raise ValueError(f"data.{key}: {value!r} is invalid; {fix}")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Training and dev shards, filters, dynamic batching and the loader's workers."""

    train: list[str] = dataclasses.field(default_factory=lambda: ["data/synth/train"])
    """Shard sources of the training corpus, pooled: shard directories, ``.tar`` files, brace
    patterns (``shards/shard-{000000..000099}.tar``) or globs (``data_pipeline.sources``); an
    index missing is built (``omni-ds make-shards`` / ``omni-ds synth`` write one)."""
    dev: dict[str, str] = dataclasses.field(default_factory=lambda: {"dev": "data/synth/dev"})
    """Dev sets by name (shard sources, or any input ``omni-ds eval`` reads), read by
    ``data_pipeline.ordered``: every utterance once, in order, unfiltered; batched under
    ``max_batch_seconds``/``max_batch_size``; unusable samples skipped and counted."""
    text_key: str = "text"
    """The key of the transcript in the shards' ``<key>.json`` labels (``<key>.txt`` labels are
    the transcript itself)."""
    tokenizer: Path = Path("data/synth/tokenizer.model")
    """SentencePiece model (``omni-ds train-tokenizer``); the model's ``vocab_size`` must be at
    least its size."""
    min_duration: float = 0.2
    """Utterances shorter than this many seconds are skipped (reason ``too_short``)."""
    max_duration: float = 30.0
    """Utterances longer than this many seconds are skipped (reason ``too_long``)."""
    max_chars_per_second: float = 40.0
    """Transcripts with more characters per audio second are skipped as misaligned
    (``chars_per_second``); 0 turns the check off."""
    min_chars_per_second: float = 0.0
    """Transcripts with fewer characters per second are skipped (``chars_per_second``); 0 = off."""
    min_pl_confidence: float = 0.0
    """Pseudo-labels whose ``pl_confidence`` is below this are skipped (``low_confidence``);
    samples without the field count as confident."""
    max_batch_seconds: float = 160.0
    """The frame budget: padded audio seconds per batch (longest utterance × batch size)."""
    max_batch_size: int = 128
    """Most utterances in one batch, whatever the budget allows."""
    num_buckets: int = 8
    """Duration buckets (equal-count quantiles of the corpus); every rank draws the same bucket
    at each step, so no rank waits on a straggler's long batch."""
    num_workers: int = 2
    """Decoding processes per rank; 0 decodes in the training process."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    max_error_rate: float = 0.05
    """Share of unreadable samples (corrupt audio or labels, missing shards) that stops the run
    with the worst shards named; filtered samples do not count."""
    error_rate_min_samples: int = 200
    """Samples read before the error-rate ceiling applies (avoids stopping on the first one)."""
    max_unk_rate: float = 0.01
    """Share of transcripts the tokenizer maps (partly) to ``<unk>`` (skip reason ``unk_target``)
    that stops the run: the tokenizer does not fit the corpus (after
    ``error_rate_min_samples`` samples)."""

    def __post_init__(self) -> None:
        if not self.train:
            _fail("train", self.train, "list at least one shard directory")
        if not 0 <= self.min_duration < self.max_duration:
            _fail(
                "min_duration",
                (self.min_duration, self.max_duration),
                "need 0 <= min_duration < max_duration (seconds)",
            )
        for key in ("max_chars_per_second", "min_chars_per_second", "min_pl_confidence"):
            if getattr(self, key) < 0:
                _fail(key, getattr(self, key), "use a value >= 0 (0 turns the filter off)")
        if self.max_chars_per_second and self.min_chars_per_second >= self.max_chars_per_second:
            _fail("min_chars_per_second", self.min_chars_per_second, "must be below the maximum")
        if self.max_batch_seconds < self.max_duration:
            _fail(
                "max_batch_seconds",
                self.max_batch_seconds,
                f"must be at least max_duration ({self.max_duration} s) so that every kept "
                "utterance fits in a batch",
            )
        for key in ("max_batch_size", "num_buckets", "prefetch_factor"):
            if getattr(self, key) < 1:
                _fail(key, getattr(self, key), "use a positive integer")
        if self.num_workers < 0:
            _fail("num_workers", self.num_workers, "use 0 (no workers) or more")
        for key in ("max_error_rate", "max_unk_rate"):
            if not 0 <= getattr(self, key) <= 1:
                _fail(key, getattr(self, key), "use a share between 0 and 1")
        if not self.text_key:
            _fail("text_key", self.text_key, "name the JSON key of the transcript, e.g. text")
        if self.error_rate_min_samples < 1:
            _fail("error_rate_min_samples", self.error_rate_min_samples, "use a positive count")
