"""The data section of an experiment: where the shards are, what to filter, how to batch.

Plain typed dataclass (``data_pipeline`` never imports ``omni_ds``); ``omni_ds.config.from_dict``
builds it from the ``data:`` section of a YAML file. Bad values raise ``ValueError`` naming the
key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlsplit

from data_pipeline.remote import Remote, is_url, redact


def _fail(key: str, value, fix: str) -> None:
    raise ValueError(f"data.{key}: {value!r} is invalid; {fix}")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Training and dev shards, filters, dynamic batching and the loader's workers."""

    train: list[str] = dataclasses.field(default_factory=lambda: ["data/synth/train"])
    """Shard sources of the training corpus, pooled: shard directories, ``.tar`` files, brace
    patterns (``shards/shard-{000000..000099}.tar``) or globs (``data_pipeline.sources``), or
    the same as ``s3://``/``https://`` URLs; an index missing is built (``omni-ds make-shards`` /
    ``omni-ds synth`` write one)."""
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

    endpoint_url: str = ""
    """Endpoint of an S3-compatible store (MinIO, Ceph...) holding ``s3://`` sources, e.g.
    ``http://minio:9000``; empty: AWS, or the endpoint of the environment / AWS config. Never
    credentials: those come from the environment or the AWS files (``data_pipeline.remote``)."""
    remote_timeout: float = 30.0
    """Seconds one request to a URL source may take before it is retried."""
    remote_retries: int = 6
    """Retries of a transient failure (timeout, 5xx, dropped connection) of a URL source, with
    backoff, before its sample counts as ``missing_shard``."""

    def remote(self) -> Remote:
        """How this config's URL sources are reached."""
        return Remote(self.endpoint_url, self.remote_timeout, self.remote_retries)

    def __post_init__(self) -> None:
        if not self.train:
            _fail("train", self.train, "list at least one shard directory")
        named = [("train", t) for t in self.train] + [("dev", d) for d in self.dev.values()]
        for key, spec in [*named, ("endpoint_url", self.endpoint_url)]:
            parts = urlsplit(str(spec))
            if is_url(spec) and (parts.password or parts.query):
                _fail(key, redact(spec), "never put credentials in a URL (it is written to the run "
                      "directory); use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials")  # fmt: skip
        if self.remote_timeout <= 0 or self.remote_retries < 0:
            _fail("remote_timeout", (self.remote_timeout, self.remote_retries),
                  "need remote_timeout > 0 seconds and remote_retries >= 0")  # fmt: skip
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
