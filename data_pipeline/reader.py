"""Read one planned batch: fetch, decode, check, tokenise, pad.

Runs in the worker processes of the training loader and of the ordered reader
(``data_pipeline.ordered``). A sample that cannot be used is skipped and counted under its reason,
or, when a batch is read ``strict`` (evaluation), stops the read with a :class:`DataError` naming
its shard and key:

| reason | what was wrong |
| --- | --- |
| ``missing_shard`` | the shard file named by the index is gone (or its URL unreachable: no such object, access denied, transient failures past the retries) |
| ``corrupt_member`` | a member is cut short (truncated tar) or unpaired |
| ``bad_label`` / ``empty_text`` | the JSON label is not UTF-8 JSON with a ``text`` / the text is empty |
| ``corrupt_audio`` | the FLAC/WAV does not decode (truncated, garbage) |
| ``empty_audio`` / ``nonfinite_audio`` | zero samples / NaN or infinite samples |
| ``silent_audio`` | digital silence (peak at most one 16-bit step) under a transcript |
| ``channel_ambiguous`` / ``bad_channel`` | channels with different signals and no ``channel`` in the label / a channel the audio does not have |
| ``sample_rate`` | the audio's rate differs from its label's, or is below 8 kHz |
| ``untokenizable`` | the tokenizer gives no tokens for the text |
| ``unk_target`` | the tokenizer maps part of the (normalised) text to ``<unk>``: it was trained on other text; above ``data.max_unk_rate`` the run stops |

A batch whose every sample was skipped cannot simply vanish (every rank must take the same number
of steps, and a model cannot run on zero rows), so it becomes a *filler*: one second of silence
with an empty transcript, key ``<filler>``, counted under ``filler_batches``. Its CTC target is
empty, so it teaches only that silence is blank. The ordered reader pads a rank's batch count with
the same filler (from an empty id list, not counted as a skip), and scoring leaves fillers out.
"""

from __future__ import annotations

import abc
import os
from collections import Counter

import numpy as np
import torch

from data_pipeline.audio import SAMPLE_RATE, AudioError, decode_bytes
from data_pipeline.index import parse_label
from data_pipeline.plan import Catalog
from data_pipeline.remote import retry_count
from data_pipeline.storage import open_shard

ERROR_REASONS = (
    "missing_shard",
    "corrupt_member",
    "bad_label",
    "empty_text",
    "corrupt_audio",
    "empty_audio",
    "nonfinite_audio",
    "silent_audio",
    "channel_ambiguous",
    "bad_channel",
    "sample_rate",
    "untokenizable",
)
UNK_REASON = "unk_target"
"""Counted apart from :data:`ERROR_REASONS`: the data is fine, the tokenizer does not fit it."""


FILLER_KEY = "<filler>"
MAX_OPEN_SHARDS = 64
ADJACENT_GAP = 4096
"""Bytes between a sample's members (tar headers, padding) still read in one go."""


class DataError(RuntimeError):
    """Unusable data: too much of it while training (the message names the worst shards), or
    any sample of a set read strictly, as evaluation does (the message names its shard and key)."""


def pad(arrays: list[np.ndarray], dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``[B, max(1, max_len)]`` tensor and the lengths ``[B]`` (int64)."""
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), max(1, int(lens.max()))), dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out), torch.from_numpy(lens)


def collate(
    audios: list[np.ndarray], texts: list[str], tokens: list, keys: list[str], bucket: int = -1
) -> dict:
    """The loader's batch dict from per-utterance float32 audio, texts and token ids."""
    audio, audio_lens = pad(audios, np.float32)
    token_ids, token_lens = pad([np.asarray(t, dtype=np.int64) for t in tokens], np.int64)
    return {
        "audio": audio,
        "audio_lens": audio_lens,
        "tokens": token_ids,
        "token_lens": token_lens,
        "keys": keys,
        "texts": texts,
        "bucket": bucket,
    }


class SampleReader(abc.ABC):
    """Turns lists of sample ids into batch dicts; a subclass says what sample ``i`` is."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def key(self, i: int) -> str: ...

    @abc.abstractmethod
    def source(self, i: int) -> str:
        """Where sample ``i`` lives (its shard, or its audio file), for error counts/messages."""

    @abc.abstractmethod
    def transcript(self, i: int) -> str:
        """The text of sample ``i`` as given (no audio read); raises AudioError(reason)."""

    @abc.abstractmethod
    def read_sample(self, i: int) -> tuple[np.ndarray, str, list[int]]:
        """(float32 16 kHz audio, text, token ids) of sample ``i``; raises AudioError(reason)."""

    def prefetch(self, ids: list[int]) -> None:  # noqa: B027 (an optional hook)
        """Fetch what ``ids`` need ahead of :meth:`read_sample` (a subclass may, in one go)."""

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return []
        tokens = self.tokenizer.encode(text)
        if not tokens:
            raise AudioError("untokenizable", f"no tokens for {text!r}")
        if self.tokenizer.unk_id in tokens:
            raise AudioError(UNK_REASON, f"<unk> in the targets of {text!r}")
        return tokens

    def read_batch(self, ids: list[int], bucket: int = -1, strict: bool = False) -> dict:
        """The batch dict of the loader contract plus ``_skipped``/``_shard_errors``/``_read``/
        ``_retries`` (per-reason and per-shard counts, samples attempted, transient storage
        failures retried), which the loaders strip."""
        retries = retry_count()
        self.prefetch(ids)
        audios, texts, tokens, keys = [], [], [], []
        skipped: Counter = Counter()
        shard_errors: Counter = Counter()
        for i in ids:
            try:
                audio, text, toks = self.read_sample(i)
            except AudioError as e:
                if strict:
                    raise DataError(
                        f"{self.source(i)}: sample {self.key(i)!r} is unusable ({e.reason}: {e}); "
                        "every utterance is scored, so fix or remove it"
                    ) from e
                skipped[e.reason] += 1
                shard_errors[self.source(i)] += 1
                continue
            audios.append(audio)
            texts.append(text)
            tokens.append(toks)
            keys.append(self.key(i))
        if not keys:
            audios, texts, tokens = [np.zeros(SAMPLE_RATE, np.float32)], [""], [[]]
            keys = [FILLER_KEY]
            if ids:  # an empty id list is a rank's padding, not lost data
                skipped["filler_batches"] += 1
        return {
            **collate(audios, texts, tokens, keys, bucket),
            "_skipped": dict(skipped),
            "_shard_errors": dict(shard_errors),
            "_read": len(ids),
            "_retries": retry_count() - retries,
        }


class BatchReader(SampleReader):
    """Samples of a :class:`Catalog`, read by byte offset (``data_pipeline.storage``: a file or
    a URL); keeps open shard files per process."""

    def __init__(self, catalog: Catalog, tokenizer=None):
        super().__init__(tokenizer)
        self.catalog = catalog
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self._fetched: dict[tuple[int, int, int], bytes | FileNotFoundError] = {}

    def key(self, i: int) -> str:
        return self.catalog.keys[i]

    def source(self, i: int) -> str:
        return self.catalog.shard_paths[self.catalog.shard_of[i]]

    def _file(self, sid: int):
        if self._pid != os.getpid():  # forked into a worker: handles are not shared
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(sid, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # batches mix shards: keep the recent ones
                self._files.pop(next(iter(self._files))).close()
            f = open_shard(self.catalog.shard_paths[sid], self.catalog.remotes[sid])
        self._files[sid] = f  # (re)inserted last: the dict's order is least recently used first
        return f

    def _span(self, i: int) -> tuple[int, int] | None:
        """[start, end) of sample ``i``'s members when one read takes both."""
        audio_off, audio_size, json_off, json_size = self.catalog.members[i].tolist()
        start = min(audio_off, json_off)
        end = max(audio_off + audio_size, json_off + json_size)
        return (start, end) if end - start <= audio_size + json_size + ADJACENT_GAP else None

    def prefetch(self, ids: list[int]) -> None:
        """The spans of the samples of ``ids`` in URL shards, by concurrent range requests."""
        self._fetched = {}
        wanted = [(i, self._span(i)) for i in ids]
        wanted = [(i, s) for i, s in wanted
                  if s and self.catalog.remotes[self.catalog.shard_of[i]] is not None]  # fmt: skip
        if not wanted:
            return
        remote = self.catalog.remotes[self.catalog.shard_of[wanted[0][0]]]
        urls = [self.catalog.shard_paths[self.catalog.shard_of[i]] for i, _ in wanted]
        got = remote.cat_ranges(urls, [s[0] for _, s in wanted], [s[1] for _, s in wanted])
        self._fetched = {(i, s[0], s[1] - s[0]): data for (i, s), data in zip(wanted, got)}

    def _read(self, i: int, offset: int, size: int) -> bytes:
        try:
            data = self._fetched.pop((i, offset, size), None)
            if isinstance(data, FileNotFoundError):
                raise data
            if data is None:
                data = self._file(int(self.catalog.shard_of[i])).read(offset, size)
            elif len(data) > size:
                raise OSError(f"{self.source(i)}: the server does not honour HTTP Range")
        except FileNotFoundError as e:
            raise AudioError("missing_shard", str(e)) from e
        if len(data) != size:
            raise AudioError("corrupt_member", f"member cut short ({len(data)} of {size} bytes)")
        return data

    def _parse(self, i: int, raw: bytes) -> dict:
        ext = "txt" if self.catalog.label_txt[i] else "json"
        return parse_label(raw, self.catalog.text_keys[self.catalog.shard_of[i]], ext)

    def transcript(self, i: int) -> str:
        _, _, json_off, json_size = self.catalog.members[i].tolist()
        return self._parse(i, self._read(i, json_off, json_size))["text"]

    def read_sample(self, i: int) -> tuple[np.ndarray, str, list[int]]:
        audio_off, audio_size, json_off, json_size = self.catalog.members[i].tolist()
        # A sample's members are neighbours in the tar: one read (one range request) takes both.
        span = self._span(i)
        if span:
            start, end = span
            span = self._read(i, start, end - start)
            raw_label = span[json_off - start : json_off - start + json_size]
            raw_audio = span[audio_off - start : audio_off - start + audio_size]
        else:
            raw_label = self._read(i, json_off, json_size)
            raw_audio = self._read(i, audio_off, audio_size)
        meta = self._parse(i, raw_label)
        audio = decode_bytes(raw_audio, meta.get("sample_rate"), meta.get("channel"))
        return audio, meta["text"], self.tokenize(meta["text"])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class PlannedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of a plan (lists of sample ids), as the worker processes read it."""

    def __init__(
        self,
        reader: SampleReader,
        batches: list[list[int]],
        buckets: list[int] | None = None,
        strict: bool = False,
    ):
        self.reader, self.batches, self.strict = reader, batches, strict
        self.buckets = buckets if buckets is not None else [-1] * len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.reader.read_batch(self.batches[i], self.buckets[i], self.strict)
