"""Lhotse manifests (icefall/k2, NeMo's Lhotse loaders) as :class:`Record` lists, without lhotse.

Accepted: a ``CutSet`` (``cuts.jsonl.gz`` / ``.jsonl``: each line a cut with its ``recording`` and
``supervisions``), or a ``SupervisionSet`` (``*supervisions*.jsonl.gz``) whose ``RecordingSet`` is
the file of the same name with ``recordings`` in place of ``supervisions``. Every supervision is
one utterance: its ``text``, its span (the cut's ``start`` + the supervision's ``start``, its
``duration``), its ``channel`` (one channel is kept as it is; several are mixed), ``speaker`` and
``language`` kept as metadata; key = the supervision id. A supervision repeated in several cuts
(``trim_to_supervisions`` keeps overlapping ones) is one utterance, written once.

Left out, each reported with why: recordings whose audio is not a local file (``url``,
``command``, ``memory`` sources), recordings with ``transforms`` (speed or volume perturbation is
not replayed), ``MixedCut`` lines, lines that are not JSON.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from data_pipeline.records import Problem, Record, safe_key


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path)


def _rows(path: Path, problems: list[Problem]):
    with _open(path) as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise TypeError("not an object")
            except (json.JSONDecodeError, TypeError) as e:
                problems.append(Problem(f"line{no}", f"{path}:{no}", "bad_label", str(e)))
                continue
            yield no, row


def is_cut_manifest(path: Path) -> bool:
    """Whether the first line of a ``.json``/``.jsonl`` file is a Lhotse cut or supervision."""
    try:
        with _open(path) as f:
            row = json.loads(f.readline())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(row, dict) and ("supervisions" in row or "recording_id" in row)


def _audio(recording: dict, channel, manifest: Path) -> tuple[str, int | str | None]:
    """(file, channel within that file) of ``channel`` of a Lhotse recording; ValueError why not."""
    if recording.get("transforms"):
        raise ValueError("the recording has transforms (perturbation), which are not replayed")
    wanted = channel if isinstance(channel, list) else [channel]
    for source in recording.get("sources", []):
        channels = source.get("channels", [0])
        if source.get("type") != "file":
            continue
        if all(c in channels for c in wanted) or channel is None:
            path = Path(source["source"])
            if not path.is_absolute() and not path.exists():
                path = manifest.parent / path
            if channel is None or len(channels) == 1:
                return str(path), None if channel is None else 0
            picked = [channels.index(c) for c in wanted]
            return str(path), picked[0] if len(picked) == 1 else "mix"
    kinds = sorted({s.get("type", "?") for s in recording.get("sources", [])})
    raise ValueError(f"no local file holds channel {channel} (sources: {', '.join(kinds)})")


def _record(sup: dict, offset: float, recording: dict, manifest: Path) -> Record:
    channel = sup.get("channel")
    if isinstance(channel, list) and len(channel) == 1:
        channel = channel[0]
    path, file_channel = _audio(recording, channel, manifest)
    if not isinstance(sup.get("text"), str):
        raise TypeError("the supervision has no text")
    meta = {k: sup[k] for k in ("speaker", "language") if sup.get(k) is not None}
    return Record(
        key=safe_key(str(sup["id"])),
        path=path,
        text=sup["text"],
        start=round(offset + float(sup["start"]), 6),
        duration=float(sup["duration"]),
        meta=meta,
        channel=file_channel,
    )


def read_cuts(path: Path) -> tuple[list[Record], list[Problem]]:
    """Records of a Lhotse CutSet or SupervisionSet manifest (module docstring)."""
    problems: list[Problem] = []
    records, seen = [], set()
    recordings = None
    if "supervisions" in path.name:
        sibling = path.with_name(path.name.replace("supervisions", "recordings"))
        if sibling.is_file():
            recordings = {row.get("id"): row for _, row in _rows(sibling, problems)}
    for no, row in _rows(path, problems):
        where = f"{path}:{no}"
        if "supervisions" in row:
            if row.get("type") == "MixedCut" or "recording" not in row:
                problems.append(Problem(safe_key(str(row.get("id", f"line{no}"))), where,
                                        "unsupported_cut", "a MixedCut (mixed tracks) is not read; "
                                        "write the cuts before mixing"))  # fmt: skip
                continue
            pairs = [(sup, float(row.get("start", 0.0)), row["recording"])
                     for sup in row["supervisions"]]  # fmt: skip
        elif "recording_id" in row and recordings is not None:
            recording = recordings.get(row["recording_id"])
            if recording is None:
                problems.append(Problem(safe_key(str(row.get("id"))), where, "missing_audio",
                                        f"recording {row['recording_id']!r} is not in the "
                                        "recordings manifest"))  # fmt: skip
                continue
            pairs = [(row, 0.0, recording)]
        else:
            problems.append(Problem(f"line{no}", where, "bad_label",
                                    "neither a cut nor a supervision with its recordings "
                                    "manifest beside it"))  # fmt: skip
            continue
        for sup, offset, recording in pairs:
            if sup.get("id") in seen:
                continue
            seen.add(sup.get("id"))
            try:
                records.append(_record(sup, offset, recording, path))
            except (KeyError, TypeError, ValueError) as e:
                key = safe_key(str(sup.get("id", f"line{no}")))
                problems.append(Problem(key, where, "unsupported_cut", str(e)))
    return records, problems
