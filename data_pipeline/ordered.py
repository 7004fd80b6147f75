"""Dev and test sets: every utterance exactly once, in file order, nothing filtered.

    reader = OrderedReader("data/dev", batch_seconds=200.0)          # strict: evaluation
    for batch in reader:                                             # the loader's batch keys
        ...
    dev = OrderedReader(path, tokenizer=tok, strict=False, rank=r, world_size=w)   # training

Training reads its shards shuffled, filtered and bucketed (``data_pipeline.loader``); scoring
needs the opposite, with the same reading code: the shard index (``data_pipeline.index``), the
catalog, ``BatchReader.read_sample``, the padding and the worker processes are the loader's. A
set PATH is

- a shard source (``data_pipeline.sources``: directory, ``.tar``, brace pattern, glob): its
  index, built where missing in the cache directory (nothing is written into the user's
  folders);
- or a corpus ``data_pipeline.manifests.read_input`` reads (NeMo JSONL or tarred, Lhotse cuts,
  Kaldi dir, LibriSpeech tree), whose audio is read as ``make-shards`` would store it (16 kHz
  mono 16-bit), then scaled to float32.

Batches hold consecutive utterances while longest × count stays within ``batch_seconds``
(durations from the index or the audio headers) and count within ``max_batch_size``.

``strict=True`` (evaluation): a sample that cannot be used (unreadable, unpaired, an index ``bad``
entry, an input entry ``read_input`` reports) raises :class:`DataError` naming its shard (or file)
and key, since skipping it would change the WER. ``strict=False`` (dev sets during training):
such samples are skipped and counted per reason (:meth:`OrderedReader.skipped`).

Over W ranks every rank computes the same batch plan and rank r takes batches r, r+W, ...; the
count is padded to a multiple of W with filler batches (key ``<filler>``, see
``data_pipeline.reader``), so every rank runs the same number of forwards.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.audio import AudioError, file_seconds, read_float, reject_silence
from data_pipeline.manifests import Record, input_format, read_input
from data_pipeline.plan import Catalog, pack, share_of_rank
from data_pipeline.reader import BatchReader, DataError, PlannedBatches, SampleReader
from data_pipeline.remote import Remote, is_url
from data_pipeline.sources import is_shard_source, open_shards
from data_pipeline.workers import worker_batches


class RecordReader(SampleReader):
    """Samples of a corpus's :class:`Record` list, read from their audio files."""

    def __init__(self, records: list[Record], tokenizer=None):
        super().__init__(tokenizer)
        self.records = records

    def key(self, i: int) -> str:
        return self.records[i].key

    def source(self, i: int) -> str:
        return self.records[i].path

    def transcript(self, i: int) -> str:
        return self.records[i].text

    def read_sample(self, i: int) -> tuple[np.ndarray, str, list[int]]:
        r = self.records[i]
        if not r.text.strip():  # make-shards leaves such inputs out, the index marks them bad
            raise AudioError("empty_text", "empty transcript")
        audio = read_float(r.path, r.start, r.duration, r.channel, r.member)
        reject_silence(audio, r.path)
        return audio, r.text, self.tokenize(r.text)


@dataclasses.dataclass
class Source:
    """A set opened for planning: its reader, each sample's seconds, and what is unusable."""

    reader: SampleReader
    seconds: np.ndarray
    bad: list[tuple[str, str, str, str]]
    """(shard or file, key, reason, message) of each sample known unusable before reading."""


def open_source(
    path: str | Path,
    tokenizer=None,
    text_key: str = "text",
    progress: bool = True,
    remote: Remote | None = None,
) -> Source:
    """The set at ``path`` (see the module docstring), in file order; URLs reached as ``remote``
    says."""
    if is_url(path) or (input_format(path) is None and is_shard_source(path)):
        shard_set = open_shards(path, text_key, beside=False, progress=progress, remote=remote)
        catalog = Catalog.from_sets([shard_set])
        bad = [(catalog.shard_paths[sid], key, reason, "marked unusable by the shard scan")
               for sid, key, reason in catalog.bad]  # fmt: skip
        return Source(BatchReader(catalog, tokenizer), catalog.seconds, bad)
    try:
        records, problems = read_input(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; nor shards (a directory of *.tar shards, a .tar, a brace pattern or a glob)"
        ) from None
    bad = [(p.source, p.key, p.reason, p.error) for p in problems]
    kept, seconds = [], []
    for r in records:
        try:
            seconds.append(file_seconds(r.path, r.start, r.duration, r.member))
        except AudioError as e:
            bad.append((r.path, r.key, e.reason, str(e)))
            continue
        kept.append(r)
    return Source(RecordReader(kept, tokenizer), np.array(seconds, dtype=np.float64), bad)


class OrderedReader:
    """Batches of one rank of the set at ``path``, in order (see the module docstring).

    Iterable any number of times, each pass the same batches. ``tokenizer`` may be None, which
    gives empty ``tokens``; ``max_batch_size`` 0 means no limit. ``num_utterances`` is the set's
    size over all ranks, known before any audio is read (for progress bars).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_seconds: float = 200.0,
        max_batch_size: int = 0,
        tokenizer=None,
        strict: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        text_key: str = "text",
        remote: Remote | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        source = open_source(path, tokenizer, text_key, progress=rank == 0, remote=remote)
        if strict and source.bad:
            where, key, reason, message = source.bad[0]
            raise DataError(
                f"{where}: sample {key!r} is unusable ({reason}: {message}); {len(source.bad)} "
                f"unusable in {path}: every utterance is scored, so fix or remove them"
            )
        self.reader, self.strict = source.reader, strict
        self.num_utterances = len(source.seconds)
        plan = pack(range(len(source.seconds)), source.seconds, batch_seconds,
                    max_batch_size or math.inf)  # fmt: skip
        plan += [[]] * (-len(plan) % world_size)  # empty: a filler batch
        self.batches = plan[rank::world_size]
        self._workers = dict(num_workers=num_workers, prefetch_factor=prefetch_factor, seed=0)
        # Each unusable sample known before reading is counted on exactly one rank.
        self._known_bad = share_of_rank([b[2] for b in source.bad], rank, world_size)
        self._skipped: Counter = Counter()

    def __len__(self) -> int:
        """Batches this rank yields per pass (the same on every rank)."""
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        self._skipped = Counter(self._known_bad)
        dataset = PlannedBatches(self.reader, self.batches, strict=self.strict)
        with worker_batches(dataset, **self._workers) as batches:
            for batch in batches:
                self._skipped.update(batch.pop("_skipped"))
                del batch["_shard_errors"], batch["_read"], batch["_retries"]
                yield batch

    def skipped(self) -> dict[str, int]:
        """Samples this rank skipped in the current (or last) pass, per reason."""
        return dict(self._skipped)
