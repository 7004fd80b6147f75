"""Read one planned batch from the shards: fetch, decode, check, tokenise, pad.

Runs in the loader's worker processes. A sample that cannot be used is skipped and counted under
its reason; nothing here raises on bad data:

| reason | what was wrong |
| --- | --- |
| ``missing_shard`` | the shard file named by the index is gone |
| ``corrupt_member`` | a member is cut short (truncated tar) or unpaired |
| ``bad_label`` / ``empty_text`` | the JSON label is not UTF-8 JSON with a ``text`` / the text is empty |
| ``corrupt_audio`` | the FLAC/WAV does not decode (truncated, garbage) |
| ``empty_audio`` / ``nonfinite_audio`` | zero samples / NaN or infinite samples |
| ``sample_rate`` | the audio's rate differs from its label's, or is below 8 kHz |
| ``untokenizable`` | the tokenizer gives no tokens for the text |

A batch whose every sample was skipped cannot simply vanish (every rank must take the same number
of steps, and a model cannot run on zero rows), so it becomes a *filler*: one second of silence
with an empty transcript, key ``<filler>``, counted under ``filler_batches``. Its CTC target is
empty, so it teaches only that silence is blank.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from data_pipeline.audio import SAMPLE_RATE, AudioError, decode_bytes
from data_pipeline.index import parse_label
from data_pipeline.plan import Catalog

ERROR_REASONS = (
    "missing_shard",
    "corrupt_member",
    "bad_label",
    "empty_text",
    "corrupt_audio",
    "empty_audio",
    "nonfinite_audio",
    "sample_rate",
    "untokenizable",
)


FILLER_KEY = "<filler>"
MAX_OPEN_SHARDS = 64


def pad(arrays: list[np.ndarray], dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``[B, max(1, max_len)]`` tensor and the lengths ``[B]`` (int64)."""
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), max(1, int(lens.max()))), dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out), torch.from_numpy(lens)


class BatchReader:
    """Turns lists of sample ids into batch dicts; keeps open shard files per process."""

    def __init__(self, catalog: Catalog, tokenizer=None):
        self.catalog = catalog
        self.tokenizer = tokenizer
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _file(self, sid: int):
        if self._pid != os.getpid():  # forked into a worker: handles are not shared
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(sid, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # batches mix shards: keep the recent ones
                self._files.pop(next(iter(self._files))).close()
            f = open(self.catalog.shard_paths[sid], "rb")
        self._files[sid] = f  # (re)inserted last: the dict's order is least recently used first
        return f

    def _member(self, f, offset: int, size: int) -> bytes:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise AudioError("corrupt_member", f"member cut short ({len(data)} of {size} bytes)")
        return data

    def read_sample(self, i: int) -> tuple[np.ndarray, str, list[int]]:
        """(float32 16 kHz audio, text, token ids) of sample ``i``; raises AudioError(reason)."""
        sid = int(self.catalog.shard_of[i])
        audio_off, audio_size, json_off, json_size = self.catalog.members[i].tolist()
        try:
            f = self._file(sid)
        except FileNotFoundError as e:
            raise AudioError("missing_shard", str(e)) from e
        meta = parse_label(self._member(f, json_off, json_size))
        audio = decode_bytes(self._member(f, audio_off, audio_size), meta.get("sample_rate"))
        tokens = self.tokenizer.encode(meta["text"]) if self.tokenizer is not None else []
        if self.tokenizer is not None and not tokens:
            raise AudioError("untokenizable", f"no tokens for {meta['text']!r}")
        return audio, meta["text"], tokens

    def read_batch(self, ids: list[int], bucket: int = -1) -> dict:
        """The batch dict of the loader contract plus ``_skipped``/``_shard_errors``/``_read``
        (per-reason and per-shard counts, samples attempted), which the loader strips."""
        audios, texts, tokens, keys = [], [], [], []
        skipped: Counter = Counter()
        shard_errors: Counter = Counter()
        for i in ids:
            try:
                audio, text, toks = self.read_sample(i)
            except AudioError as e:
                skipped[e.reason] += 1
                shard_errors[self.catalog.shard_paths[self.catalog.shard_of[i]]] += 1
                continue
            audios.append(audio)
            texts.append(text)
            tokens.append(np.asarray(toks, dtype=np.int64))
            keys.append(self.catalog.keys[i])
        if not keys:
            audios, texts, tokens, keys = (
                [np.zeros(SAMPLE_RATE, np.float32)],
                [""],
                [[]],
                [FILLER_KEY],
            )
            skipped["filler_batches"] += 1
        audio_t, audio_lens = pad(audios, np.float32)
        tokens_t, token_lens = pad(tokens, np.int64)
        return {
            "audio": audio_t,
            "audio_lens": audio_lens,
            "tokens": tokens_t,
            "token_lens": token_lens,
            "keys": keys,
            "texts": texts,
            "bucket": bucket,
            "_skipped": dict(skipped),
            "_shard_errors": dict(shard_errors),
            "_read": len(ids),
        }

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
