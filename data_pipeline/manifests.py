"""Read the corpus formats users already have into one list of :class:`Record`.

| format | INPUT | audio | transcript |
| --- | --- | --- | --- |
| NeMo manifest | ``*.json`` / ``*.jsonl`` file | ``audio_filepath`` (+ ``offset``/``duration``) | ``text`` |
| LibriSpeech tree | directory with ``*/*/*.trans.txt`` | ``<utt>.flac`` beside the transcript | ``UTT TEXT`` lines |
| Kaldi data dir | directory with ``wav.scp`` + ``text`` | ``wav.scp`` paths, cut by ``segments`` | ``text`` |

Other fields of a NeMo line (``pl_confidence``, ``pl_teacher``, speaker, ...) and Kaldi's
``utt2spk`` are kept as metadata. Entries that cannot be used (no audio path, a pipe command in
``wav.scp``, non-UTF-8 lines, duplicate keys) are returned as problems for the report, never dropped
silently.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclasses.dataclass
class Record:
    """One utterance to shard."""

    key: str
    """WebDataset key: letters, digits, ``_`` and ``-`` only (a dot would end the key)."""
    path: str
    """Audio file."""
    text: str
    start: float = 0.0
    """Offset into the file, seconds."""
    duration: float | None = None
    """Seconds from ``start``; None = to the end of the file."""
    meta: dict = dataclasses.field(default_factory=dict)
    """Extra label fields written to the sample's JSON (pseudo-label metadata, speaker, ...)."""


@dataclasses.dataclass
class Problem:
    """An input entry that is left out, with why; goes to the shard directory's report."""

    key: str
    source: str
    reason: str
    error: str


def safe_key(name: str) -> str:
    return _UNSAFE.sub("_", name)


def _lines(path: Path, problems: list[Problem]):
    """(line number, text) of a text file; lines that are not UTF-8 become problems."""
    for no, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(f"line{no}", f"{path}:{no}", "bad_label", str(e)))
            continue
        if line.strip():
            yield no, line


def read_nemo(manifest: Path) -> tuple[list[Record], list[Problem]]:
    records, problems = [], []
    for no, line in _lines(manifest, problems):
        where = f"{manifest}:{no}"
        try:
            row = json.loads(line)
            audio = Path(row.pop("audio_filepath"))
            text = row.pop("text")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            problems.append(Problem(f"line{no}", where, "bad_label", f"not a manifest line: {e}"))
            continue
        if not audio.is_absolute():
            audio = manifest.parent / audio
        offset = float(row.pop("offset", 0.0) or 0.0)
        duration = row.pop("duration", None)
        key = row.pop("key", None) or audio.stem + (
            f"_{round(offset * 1000):08d}" if offset else ""
        )
        records.append(
            Record(
                key=safe_key(str(key)),
                path=str(audio),
                text=str(text),
                start=offset,
                # Without an offset the whole file is the utterance; the manifest's duration is
                # then only informative (and often rounded).
                duration=float(duration) if offset and duration is not None else None,
                meta=row,
            )
        )
    return records, problems


def read_librispeech(root: Path) -> tuple[list[Record], list[Problem]]:
    records, problems = [], []
    for trans in sorted(root.rglob("*.trans.txt")):
        for _, line in _lines(trans, problems):
            utt, _, text = line.strip().partition(" ")
            records.append(
                Record(key=safe_key(utt), path=str(trans.parent / f"{utt}.flac"), text=text)
            )
    return records, problems


def _table(path: Path, problems: list[Problem]) -> dict[str, str]:
    out = {}
    if path.is_file():
        for _, line in _lines(path, problems):
            key, _, rest = line.strip().partition(" ")
            out[key] = rest.strip()
    return out


def read_kaldi(data_dir: Path) -> tuple[list[Record], list[Problem]]:
    problems: list[Problem] = []
    wavs = _table(data_dir / "wav.scp", problems)
    texts = _table(data_dir / "text", problems)
    speakers = _table(data_dir / "utt2spk", problems)
    segments = {}
    for _, line in (
        _lines(data_dir / "segments", problems) if (data_dir / "segments").is_file() else ()
    ):
        utt, rec, start, end = line.split()[:4]
        segments[utt] = (rec, float(start), float(end))
    records = []
    for utt, text in texts.items():
        rec, start, end = segments.get(utt, (utt, 0.0, None))
        source = wavs.get(rec)
        if source is None or source.endswith("|"):
            why = "no wav.scp entry" if source is None else "pipe commands in wav.scp are not run"
            problems.append(
                Problem(safe_key(utt), f"{data_dir}/wav.scp:{rec}", "unreadable_audio", why)
            )
            continue
        path = Path(source)
        meta = {"speaker": speakers[utt]} if utt in speakers else {}
        records.append(
            Record(
                key=safe_key(utt),
                path=str(path if path.is_absolute() else data_dir / path),
                text=text,
                start=start,
                duration=None if end is None else end - start,
                meta=meta,
            )
        )
    return records, problems


def read_input(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Records of a NeMo manifest, LibriSpeech tree or Kaldi data dir (detected from ``path``)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        records, problems = read_nemo(path)
    elif (path / "wav.scp").is_file():
        records, problems = read_kaldi(path)
    elif path.is_dir() and next(path.rglob("*.trans.txt"), None) is not None:
        records, problems = read_librispeech(path)
    else:
        raise FileNotFoundError(
            f"{path}: not a NeMo manifest (.json/.jsonl), a Kaldi data dir (wav.scp) or a "
            "LibriSpeech tree (*.trans.txt)"
        )
    seen: set[str] = set()
    unique = []
    for r in records:
        if r.key in seen:
            problems.append(Problem(r.key, r.path, "duplicate_key", "key already used"))
        else:
            seen.add(r.key)
            unique.append(r)
    return unique, problems
