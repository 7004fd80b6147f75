"""Read the corpus formats users already have into one list of :class:`Record`.

| format | INPUT | audio | transcript |
| --- | --- | --- | --- |
| NeMo manifest | ``*.json`` / ``*.jsonl`` file | ``audio_filepath`` (+ ``offset``/``duration``) | ``text`` |
| NeMo tarred | ``tarred_audio_manifest.json`` (or its directory) + ``audio_N.tar`` | member ``audio_filepath`` of ``audio_<shard_id>.tar`` | ``text`` |
| Lhotse CutSet | ``*.jsonl`` / ``*.jsonl.gz`` of cuts (``data_pipeline.cuts``) | each supervision's span of its recording | supervision ``text`` |
| LibriSpeech tree | directory with ``*/*/*.trans.txt`` | ``<utt>.flac`` beside the transcript | ``UTT TEXT`` lines |
| Kaldi data dir | directory with ``wav.scp`` + ``text`` | ``wav.scp`` paths, cut by ``segments`` | ``text`` |

Other fields of a NeMo line (``pl_confidence``, ``pl_teacher``, speaker, ...) and Kaldi's
``utt2spk`` are kept as metadata; a NeMo line's ``channel`` (0-based, or ``mix``) chooses the
channel of multi-channel audio (``data_pipeline.audio.select_channel``). Entries that cannot be used (no audio path, a pipe command in
``wav.scp``, non-UTF-8 lines, duplicate keys) are returned as problems for the report, never dropped
silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.records import Problem, Record, safe_key

__all__ = ["Problem", "Record", "input_format", "read_input"]


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


NEMO_TARRED = "tarred_audio_manifest.json"


def _channel(value) -> int | str | None:
    if value is None or value == "mix" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"channel {value!r} is not a 0-based number or 'mix'")


def read_nemo(manifest: Path) -> tuple[list[Record], list[Problem]]:
    """A NeMo manifest; lines with a ``shard_id`` (tarred datasets) name a member of
    ``audio_<shard_id>.tar`` beside the manifest."""
    records, problems = [], []
    for no, line in _lines(manifest, problems):
        where = f"{manifest}:{no}"
        try:
            row = json.loads(line)
            audio = Path(row.pop("audio_filepath"))
            text = row.pop("text")
            channel = _channel(row.pop("channel", None))
            shard = row.pop("shard_id", None)
            if not isinstance(text, str):
                raise TypeError(f"text {text!r} is not a string")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            problems.append(Problem(f"line{no}", where, "bad_label", f"not a manifest line: {e}"))
            continue
        member = None
        if shard is not None:
            member, audio = str(audio), Path(f"audio_{shard}.tar")
        if not audio.is_absolute():
            audio = manifest.parent / audio
        offset = float(row.pop("offset", 0.0) or 0.0)
        duration = row.pop("duration", None)
        stem = audio.stem if member is None else Path(member).name.partition(".")[0]
        key = row.pop("key", None) or stem + (f"_{round(offset * 1000):08d}" if offset else "")
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
                channel=channel,
                member=member,
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


def input_format(path: str | Path) -> str | None:
    """Which corpus format ``path`` is (a row of the module docstring's table), or None."""
    path = Path(path)
    name = path.name
    if path.is_file() and (name.endswith(".jsonl.gz") or name.endswith(".json.gz")):
        return "lhotse"
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        from data_pipeline.cuts import is_cut_manifest

        return "lhotse" if is_cut_manifest(path) else "nemo"
    if path.is_dir() and (path / NEMO_TARRED).is_file():
        return "nemo_tarred"
    if (path / "wav.scp").is_file():
        return "kaldi"
    if path.is_dir() and next(path.rglob("*.trans.txt"), None) is not None:
        return "librispeech"
    return None


def read_input(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Records of a corpus of the module docstring's table (the format detected from ``path``)."""
    path = Path(path)
    kind = input_format(path)
    if kind == "nemo":
        records, problems = read_nemo(path)
    elif kind == "nemo_tarred":
        records, problems = read_nemo(path / NEMO_TARRED)
    elif kind == "lhotse":
        from data_pipeline.cuts import read_cuts

        records, problems = read_cuts(path)
    elif kind == "kaldi":
        records, problems = read_kaldi(path)
    elif kind == "librispeech":
        records, problems = read_librispeech(path)
    else:
        why = "does not exist" if not path.exists() else "is not a corpus omni-ds reads"
        raise FileNotFoundError(
            f"{path}: {why}; name a NeMo manifest (.json/.jsonl, tarred: the directory of "
            "tarred_audio_manifest.json), a Lhotse CutSet (.jsonl.gz), a Kaldi data dir "
            "(wav.scp) or a LibriSpeech tree (*.trans.txt)"
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
