"""Test sets for evaluation: every utterance, in a fixed order, nothing filtered.

Training reads data through ``data_pipeline`` (shuffled, filtered, bucketed, split over ranks);
scoring needs the opposite: each utterance of the set exactly once, in a reproducible order, with
its reference text untouched. A test set PATH is one of:

- a directory of WebDataset shards (``*.tar``, read in name order) or one ``.tar`` shard, whose
  members are ``<key>.flac`` (or ``.wav``) + ``<key>.json`` with a ``text`` field, as written by
  ``omni-ds make-shards`` and ``omni-ds synth``;
- a NeMo-style JSONL manifest: one ``{"audio_filepath", "text"[, "offset", "duration"]}`` per
  line, relative paths taken from the manifest's directory.

Audio goes through ``data_pipeline.audio``, as in training: mixed down to mono and resampled to
16 kHz (soxr) if needed; manifest audio is quantised to 16-bit as ``make-shards`` would store it.
An unreadable file stops the evaluation with its name (skipping it would change the WER).
Batches hold consecutive utterances while ``longest × count`` stays within ``batch_seconds``.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.audio import SAMPLE_RATE, AudioError, decode_bytes, read_file

AUDIO_EXTENSIONS = (".flac", ".wav")


@dataclasses.dataclass
class Utterance:
    key: str
    audio: np.ndarray
    """float32 [S] mono, 16 kHz."""
    text: str


def read_audio_file(path: str | Path, start: float = 0.0, duration: float | None = None):
    """A file (or a segment of it, in seconds) as float32 16 kHz mono."""
    return read_file(str(path), start, duration).astype(np.float32) / 32768.0


def _read_tar(path: Path) -> Iterator[Utterance]:
    pending: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, dot, ext = member.name.partition(".")
            entry = pending.setdefault(key, {})
            data = tar.extractfile(member).read()
            if "." + ext in AUDIO_EXTENSIONS:
                entry["audio"] = data
            elif ext == "json":
                entry["meta"] = json.loads(data)
            if "audio" in entry and "meta" in entry:
                del pending[key]
                try:
                    audio = decode_bytes(entry["audio"])
                except AudioError as e:
                    raise AudioError(e.reason, f"{path}: sample {key!r}: {e}") from e
                yield Utterance(key, audio, entry["meta"]["text"])
    if pending:
        raise ValueError(
            f"{path}: {len(pending)} samples lack audio or a json label (e.g. "
            f"{next(iter(pending))!r}); the shard is incomplete"
        )


def _read_manifest(path: Path) -> Iterator[Utterance]:
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            audio_path = Path(row["audio_filepath"])
            if not audio_path.is_absolute():
                audio_path = path.parent / audio_path
            # with an offset, duration delimits a segment; without, it describes the whole file
            offset = float(row.get("offset", 0.0))
            duration = float(row["duration"]) if "offset" in row else None
            key = row.get("key") or f"{audio_path.stem}-{line_no}"
            yield Utterance(key, read_audio_file(audio_path, offset, duration), row["text"])


def read_test_set(path: str | Path) -> Iterator[Utterance]:
    """Every utterance of the test set at ``path`` (see the module docstring), in order."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{path} holds no *.tar shards; pass a shard dir or a manifest")
        for shard in shards:
            yield from _read_tar(shard)
    elif path.suffix == ".tar":
        yield from _read_tar(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _read_manifest(path)
    else:
        raise FileNotFoundError(f"{path}: not a shard directory, a .tar shard or a .jsonl manifest")


def count_utterances(path: str | Path) -> int | None:
    """Utterances in the test set without decoding it (for the progress bar), if cheaply known:
    from a shard directory's ``index.json`` or a manifest's lines."""
    path = Path(path)
    if path.is_dir() and (path / "index.json").is_file():
        index = json.loads((path / "index.json").read_text())
        return sum(s["num_samples"] for s in index["shards"])
    if path.suffix in (".jsonl", ".json") and path.is_file():
        return sum(1 for line in open(path) if line.strip())
    return None


def open_test_set(path: str | Path, batch_seconds: float = 200.0) -> Iterator[dict]:
    """Batches ``{"audio", "audio_lens", "keys", "texts"}`` (the loader's keys) of the test set."""
    from omni_ds.eval.inference import pad_batch

    budget = batch_seconds * SAMPLE_RATE
    batch: list[Utterance] = []
    longest = 0

    def emit(items: list[Utterance]) -> dict:
        audio, lens = pad_batch([u.audio for u in items])
        return {
            "audio": audio,
            "audio_lens": lens,
            "keys": [u.key for u in items],
            "texts": [u.text for u in items],
        }

    for utt in read_test_set(path):
        n = len(utt.audio)
        if batch and max(longest, n) * (len(batch) + 1) > budget:
            yield emit(batch)
            batch, longest = [], 0
        batch.append(utt)
        longest = max(longest, n)
    if batch:
        yield emit(batch)
