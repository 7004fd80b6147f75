"""The shard index: what every shard holds, so readers plan epochs without scanning audio.

``DIR/index.json`` (written by ``omni-ds make-shards``, ``omni-ds synth``, or
``omni-ds make-shards --index-only DIR`` for shards made by other tools)::

    {"version": 1, "sample_rate": 16000, "text_key": "text",
     "shards": [{"name": "shard-000000.tar", "num_samples": 812, "duration": 2391.4,
                 "bytes": 61234176, "sha256": "...",
                 "samples": [[key, seconds, chars, pl_confidence, audio_offset, audio_size,
                              label_offset, label_size, audio_ext(, "txt")], ...],
                 "bad": [[key, reason], ...]}]}

Sample rows give byte offsets of the members' data inside the tar, so a reader fetches exactly one
utterance; ``bad`` lists samples the scan found unusable (unpaired or damaged members, unreadable
labels, empty transcripts, audio headers that do not parse), which readers count as skipped.
A sample's label is ``<key>.json`` (its transcript under ``text_key``, default ``text``) or, where
a sample has no JSON, ``<key>.txt`` (the whole member is the transcript; the row then ends with
``"txt"``). ``name`` is relative to the index's directory (``sub/shard-0.tar`` for shards that
``data_pipeline.sources`` gathered from several folders).

An index that ``data_pipeline.sources`` built on first use (not ``make-shards``, ``synth`` or
``--index-only``) says ``"auto": true``; index entries of local shards it wrote also record
``mtime_ns``. Loading an index checks every local shard against its entry (:func:`changed_shards`):
a size that differs, or a file modified since it was indexed (a different ``mtime_ns``, or, where
none is recorded, newer than the index file) whose members moved (tar headers no longer where the
index says, spot-checked). A same-size rewrite that keeps every member in place is not caught;
it also cannot mis-pair audio and labels. Offsets into a rewritten shard
would pair the wrong audio and labels, so a user's index that is stale is refused
(:class:`StaleIndexError`, naming the shard and the fix); an automatic one is re-indexed by
``data_pipeline.sources``. Shards of URL indexes are not checked here (their cached indexes are
keyed by the objects' sizes and ETags instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from data_pipeline import remote as urls
from data_pipeline.audio import MIN_SAMPLE_RATE, SAMPLE_RATE, AudioError, header
from data_pipeline.remote import Remote, is_url
from data_pipeline.storage import read_all

INDEX_FILE = "index.json"
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "opus")  # what soundfile (libsndfile) decodes
# Column order of a sample row.
KEY, SECONDS, CHARS, CONFIDENCE, AUDIO_OFF, AUDIO_SIZE, JSON_OFF, JSON_SIZE, AUDIO_EXT = range(9)
LABEL_EXT = 9
"""Present (``"txt"``) only in rows whose label is a ``.txt`` member."""
LABEL_EXTS = ("json", "txt")


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def parse_label(raw: bytes, text_key: str = "text", ext: str = "json") -> dict:
    """A sample's label as a dict whose ``text`` is the transcript (from ``text_key`` of a JSON
    label, or the whole of a ``txt`` one); raises :class:`AudioError` with reason
    ``bad_label``/``empty_text``."""
    if ext == "txt":
        try:
            meta = {"text": raw.decode("utf-8").strip()}
        except UnicodeDecodeError as e:
            raise AudioError("bad_label", f"label is not UTF-8 text: {e}") from e
    else:
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AudioError("bad_label", f"label is not UTF-8 JSON: {e}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get(text_key), str):
            raise AudioError("bad_label", f"label has no {text_key!r} string")
        meta["text"] = meta[text_key]
    if not meta["text"].strip():
        raise AudioError("empty_text", "empty transcript")
    return meta


def scan_shard(path: Path, name: str | None = None, text_key: str = "text",
               data: bytes | None = None) -> dict:  # fmt: skip
    """Index one tar shard (see the module docstring) under ``name`` (default: the file name),
    from ``data`` when given (a downloaded shard); never raises on damaged content."""
    data = path.read_bytes() if data is None else data
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        # ignore_zeros steps over a damaged header to the next valid one instead of stopping.
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", ignore_zeros=True) as tar:
            for m in tar:
                if m.isfile():
                    key, ext = split_name(m.name)
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError):
        pass  # truncated: keep what was read; incomplete samples become corrupt_member below
    samples, bad = [], []
    for key, parts in members.items():
        ext = next((e for e in AUDIO_EXTS if e in parts), None)
        label_ext = next((e for e in LABEL_EXTS if e in parts), None)
        if ext is None or label_ext is None or any(o + s > len(data) for o, s in parts.values()):
            bad.append([key, "corrupt_member"])
            continue
        (a_off, a_size), (j_off, j_size) = parts[ext], parts[label_ext]
        try:
            meta = parse_label(data[j_off : j_off + j_size], text_key, label_ext)
            rate, frames = header(data[a_off : a_off + a_size])
            declared = meta.get("sample_rate")
            if rate < MIN_SAMPLE_RATE or (declared is not None and declared != rate):
                raise AudioError("sample_rate", f"{rate} Hz (label says {declared})")
            if frames == 0:
                raise AudioError("empty_audio", "no samples")
        except AudioError as e:
            bad.append([key, e.reason])
            continue
        conf = meta.get("pl_confidence")
        row = [
            key,
            round(frames / rate, 4),
            len(meta["text"]),
            None if conf is None else float(conf),
        ]
        samples.append([*row, a_off, a_size, j_off, j_size, ext] + ["txt"] * (label_ext == "txt"))
    return {
        "name": name or path.name,
        "num_samples": len(samples),
        "duration": round(sum(s[SECONDS] for s in samples), 3),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "samples": samples,
        "bad": bad,
    }


class StaleIndexError(ValueError):
    """A user's index whose shards changed since it was written; the message names the shard,
    what changed and the command that re-indexes it."""


def write_index(directory: Path, shards: list[dict], text_key: str = "text",
                path: Path | None = None, auto: bool = False) -> Path:  # fmt: skip
    """Write ``DIR/index.json`` (or ``path``) for ``shards`` (as :func:`scan_shard` returns them);
    ``auto``: built on first use, not asked for (module docstring)."""
    index = {"version": 1, "sample_rate": SAMPLE_RATE, "shards": shards}
    if text_key != "text":
        index["text_key"] = text_key
    if auto:
        index["auto"] = True
    path = path or directory / INDEX_FILE
    # A per-process temporary name: ranks that index the same shards never share one.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    tmp.replace(path)
    return path


def scan_shards(directory: Path | str, shards: list[Path] | list[str], text_key: str = "text",
                progress: bool = False, remote: Remote | None = None) -> list[dict]:  # fmt: skip
    """:func:`scan_shard` of ``shards`` (named relative to ``directory``; URLs are downloaded
    once each); writes nothing."""
    from data_pipeline.progress import progress_bar

    if is_url(directory):
        names = [urls.relative(u, directory) for u in shards]
        title = urls.redact(directory)
    else:
        names = [os.path.relpath(p, directory) for p in shards]
        title = directory.name or directory
    bar = progress_bar(len(shards), f"index {title}", "shard", progress)
    out = []
    for p, name in zip(shards, names):
        out.append(scan_shard(Path(name), name, text_key, read_all(p, remote)))
        bar.update(1)
    bar.close()
    return out


def scan_directory(directory: Path, progress: bool = False, text_key: str = "text") -> list[dict]:
    """:func:`scan_shard` of every ``*.tar`` in ``directory``, in name order; writes nothing."""
    shards = sorted(directory.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{directory} holds no *.tar shards")
    return scan_shards(directory, shards, text_key, progress)


def index_directory(directory: Path, progress: bool = False, text_key: str = "text") -> Path:
    """Scan every ``*.tar`` in ``directory`` (name order) and write its index."""
    return write_index(directory, scan_directory(directory, progress, text_key), text_key)


@dataclasses.dataclass
class ShardSet:
    """The shards of one directory (or folder URL), from its index."""

    directory: Path | str
    shards: list[dict]
    text_key: str = "text"
    """Where the transcript is in the shards' JSON labels."""
    remote: Remote | None = None
    """How the shards are reached when ``directory`` is a URL."""
    auto: bool = False
    """Whether ``data_pipeline.sources`` built the index on first use (module docstring)."""
    stale: dict[str, str] = dataclasses.field(default_factory=dict)
    """Shards of an automatic index changed since they were indexed: name -> what changed."""

    def path(self, name: str) -> Path | str:
        """The path or URL of the shard ``name`` of the index."""
        return urls.join(self.directory, name) if is_url(self.directory) else self.directory / name

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards)

    @property
    def duration(self) -> float:
        return sum(s["duration"] for s in self.shards)


SPOT_SAMPLES = 8
"""Samples, spread over a shard (first and last among them), whose tar headers
:func:`_members_in_place` reads."""


def _members_in_place(path: Path, entry: dict) -> bool:
    """Whether the tar headers just before the recorded data offsets still name the entry's
    members with their sizes, for :data:`SPOT_SAMPLES` samples: what readers rely on. A copied or
    touched shard passes after a few 512-byte reads (hashing it would read the whole shard, on
    every load and rank); a rewrite that moves members fails."""
    rows = entry["samples"]
    picks = sorted({round(i * (len(rows) - 1) / (SPOT_SAMPLES - 1)) for i in range(SPOT_SAMPLES)})
    with open(path, "rb") as f:
        for row in (rows[i] for i in picks if rows):
            label_ext = row[LABEL_EXT] if len(row) > LABEL_EXT else "json"
            for offset, size, ext in ((row[AUDIO_OFF], row[AUDIO_SIZE], row[AUDIO_EXT]),
                                      (row[JSON_OFF], row[JSON_SIZE], label_ext)):  # fmt: skip
                name = f"{row[KEY]}.{ext}"
                f.seek(max(offset - tarfile.BLOCKSIZE, 0))
                try:
                    info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "strict")
                except (tarfile.HeaderError, UnicodeDecodeError):
                    return False
                # A name over the header's 100 bytes lives in a GNU/pax record before it: the
                # size still tells.
                if info.size != size or (len(name.encode()) <= 100 and info.name != name):
                    return False
    return True


def changed_shards(shard_set: ShardSet, index_path: Path, verify: bool = True) -> dict[str, str]:
    """name -> what changed, for the local shards of ``shard_set`` (read from ``index_path``)
    that differ from their entries: the size (``os.stat``), or a modification since indexing
    (module docstring) which ``verify`` confirms by reading the tar headers at the recorded
    offsets (:func:`_members_in_place`: a copied or touched shard is unchanged). Missing shards
    are left to the readers (``missing_shard``)."""
    if is_url(shard_set.directory):
        return {}
    written = index_path.stat().st_mtime_ns
    changed = {}
    for entry in shard_set.shards:
        path = shard_set.path(entry["name"])
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        recorded = entry.get("bytes", st.st_size)
        if st.st_size != recorded:
            changed[entry["name"]] = f"is {st.st_size} bytes, the index says {recorded}"
            continue
        mtime = entry.get("mtime_ns")
        modified = st.st_mtime_ns > written if mtime is None else st.st_mtime_ns != mtime
        if modified and (not verify or not _members_in_place(path, entry)):
            changed[entry["name"]] = (
                f"was rewritten after it was indexed (same {st.st_size} bytes"
                + (", members moved)" if verify else ")")
            )
    return changed


def stale_message(index_path: Path | str, directory: Path | str, changed: dict[str, str]) -> str:
    """The one-line refusal of a user's index whose shards ``changed``."""
    name, what = next(iter(changed.items()))
    more = f" (and {len(changed) - 1} more shards)" if len(changed) > 1 else ""
    return (
        f"{index_path} is stale: shard {name} {what}{more}; its offsets would pair the wrong "
        f"audio and labels. Re-index with `omni-ds make-shards --index-only {directory}`"
    )


def load_index(
    directory: str | Path,
    path: Path | str | None = None,
    remote: Remote | None = None,
    check: bool = True,
) -> ShardSet:
    """The shards of ``DIR/index.json`` (or of the index at ``path``, for shards in ``DIR``);
    ``directory`` and ``path`` may be URLs. With ``check``, local shards are compared with their
    entries (module docstring): a user's stale index raises :class:`StaleIndexError`, an
    automatic one lists its changed shards in ``stale``."""
    if is_url(path or directory):
        where = path or urls.join(str(directory), INDEX_FILE)
        index = json.loads(read_all(where, remote))
        return _shard_set(index, where, directory, remote)
    directory = directory if is_url(directory) else Path(directory)
    path = path or directory / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; write shards with `omni-ds make-shards`, or index existing "
            f"ones with `omni-ds make-shards --index-only {directory}`"
        )
    shard_set = _shard_set(json.loads(path.read_text()), path, directory, remote)
    if check:
        changed = changed_shards(shard_set, path, verify=not shard_set.auto)
        if changed and not shard_set.auto:
            raise StaleIndexError(stale_message(path, directory, changed))
        shard_set.stale = changed
    return shard_set


def _shard_set(index: dict, where, directory, remote: Remote | None) -> ShardSet:
    if index.get("version") != 1:
        raise ValueError(f"{where}: unknown index version {index.get('version')!r}")
    url_remote = (remote or Remote()) if is_url(directory) else None
    text_key = index.get("text_key", "text")
    return ShardSet(directory, index["shards"], text_key, url_remote, index.get("auto", False))
