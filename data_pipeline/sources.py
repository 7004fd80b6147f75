"""Where shards are: the one place that turns what a user names into indexed shard sets.

Every command that takes shards (``data.train``, ``data.dev``, ``train-tokenizer``, ``eval``,
``analyze``, ``make-shards --index-only``) resolves its inputs here. A source SPEC is

| form | example | what is read |
| --- | --- | --- |
| shard directory | ``shards/train`` | its ``*.tar``, in name order |
| tar file | ``shards/train/shard-000003.tar`` | that shard |
| brace pattern | ``shards/shard-{000000..000003}.tar`` | each expansion (bash / ``braceexpand`` rules), in order |
| glob | ``corpus/*/shard-*.tar`` | every match, in name order |
| URL of any form above | ``s3://bucket/train/shard-{000000..000099}.tar``, ``https://host/train/`` | the same, over ``data_pipeline.remote`` |

Samples are WebDataset members sharing a key: audio (``flac``, ``wav``, ``mp3``, ``ogg``,
``opus``) plus ``<key>.json`` (transcript under ``text_key``, default ``text``) or ``<key>.txt``.

The index (``data_pipeline.index``) is built when missing, with progress: a directory's own
``DIR/index.json`` when the directory is writable (what ``make-shards`` writes); for patterns,
single tars, read-only directories, or when ``beside=False`` (evaluation never writes into a
user's folders), ``index-<key>.json`` in the cache directory (``$OMNI_DS_CACHE``, else
``$XDG_CACHE_HOME/omni-ds``, else ``~/.cache/omni-ds``), keyed by the shards' paths and the text
key. Ranks that open the same source at once build it once (a file lock); the others read what it
wrote.

A shard rewritten in place after it was indexed (``data_pipeline.index.changed_shards``: its
size, or its modification time and content) is re-indexed when the index is one built here: only
the changed shards are scanned again, and a line names them. A stale index that a user wrote
(``make-shards``, ``synth``, ``--index-only``) is refused rather than guessed at
(``StaleIndexError``, naming the shard and ``omni-ds make-shards --index-only DIR``).

A URL (``s3://``, ``https://``, ``http://``; ``data_pipeline.remote``) names the same forms; a
folder URL whose ``index.json`` exists is read from that index alone (an HTTP server need not list
folders), and an index that is missing is built by downloading each shard once, into the cache
(nothing is written to the store), keyed by the shards' URLs, sizes and ETags (so a changed
object is indexed afresh; an ``index.json`` on the store is trusted as it is).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import sys
from pathlib import Path

from data_pipeline import remote as urls
from data_pipeline.index import INDEX_FILE, ShardSet, load_index, scan_shards, write_index
from data_pipeline.remote import Remote, is_url


class SourceError(FileNotFoundError):
    """A source that names no shards; the message names the source and the fix."""


def _local_path(spec: str) -> Path:
    return Path(spec).expanduser()


def _brace(spec: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(spec))


def is_pattern(spec: str | Path) -> bool:
    return any(c in str(spec) for c in "*?[{")


def _is_object(url: str, remote: Remote) -> bool:
    try:
        return remote.call(url, "info", url)["type"] == "file"
    except FileNotFoundError:
        return False


def _expand_url(spec: str, remote: Remote) -> list[str]:
    fs = remote.filesystem(spec)
    if "{" in spec:
        found = _brace(spec)
        missing = [u for u in found if not _is_object(u, remote)]
        if missing:
            raise SourceError(
                f"{urls.redact(spec)}: {len(missing)} of the {len(found)} shards it expands to "
                f"do not exist (first: {urls.redact(missing[0])}); check the pattern's range"
            )
        return found
    if is_pattern(spec):
        found = sorted(fs.unstrip_protocol(u) for u in remote.call(spec, "glob", spec))
    elif spec.endswith(".tar"):
        found = [spec] if _is_object(spec, remote) else []
    else:
        try:
            found = sorted(
                fs.unstrip_protocol(u) for u in remote.call(spec, "ls", spec, detail=False)
            )
        except FileNotFoundError:
            found = []
    found = [u for u in found if u.endswith(".tar")]
    if not found:
        raise SourceError(
            f"{urls.redact(spec)}: names no .tar shard; name a folder URL (its index.json, or "
            "its *.tar where the store lists folders), a .tar URL, a brace pattern or a glob"
        )
    return found


def expand(spec: str | Path, remote: Remote | None = None) -> list[Path] | list[str]:
    """The tar shards ``spec`` names (module docstring), in order, as paths or URLs; raises
    :class:`SourceError` naming what was looked for when there are none."""
    spec = str(spec)
    if is_url(spec):
        return _expand_url(spec, remote or Remote())
    if "{" in spec:
        paths = [_local_path(s) for s in _brace(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise SourceError(
                f"{spec}: {len(missing)} of the {len(paths)} shards it expands to do not exist "
                f"(first: {missing[0]}); check the pattern's range and folder"
            )
        return paths
    path = _local_path(spec)
    if is_pattern(spec):
        paths = sorted(Path(p) for p in glob.glob(str(path)) if p.endswith(".tar"))
        if not paths:
            raise SourceError(f"{spec}: no .tar file matches this pattern; check the folder")
        return paths
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise SourceError(
                f"{spec}: the directory holds no *.tar shards; write them with "
                "`omni-ds make-shards INPUT --out DIR`"
            )
        return paths
    if path.is_file() and path.suffix == ".tar":
        return [path]
    raise SourceError(
        f"{spec}: does not exist; name a shard directory, a .tar file, a brace pattern "
        "(shard-{000000..000009}.tar) or a glob (*.tar)"
    )


def is_shard_source(spec: str | Path, remote: Remote | None = None) -> bool:
    """Whether ``spec`` names shards (rather than a corpus such as a manifest); no scanning."""
    if is_url(spec) and _own_index(str(spec), remote or Remote()):
        return True
    try:
        expand(spec, remote)
    except SourceError:
        return False
    return True


def cache_dir() -> Path:
    if os.environ.get("OMNI_DS_CACHE"):
        return Path(os.environ["OMNI_DS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "omni-ds"


def _cache_key(paths: list[Path] | list[str], text_key: str, remote: Remote) -> str:
    stats = []
    for p in paths:
        if is_url(p):
            info = remote.call(p, "info", p)
            version = next(
                (info[k] for k in ("ETag", "LastModified", "Last-Modified") if k in info), None
            )
            stats.append([p, info.get("size"), str(version)])
        else:  # local shards: their index entries are checked on load (module docstring)
            stats.append(str(p.resolve()))
    return hashlib.sha256(json.dumps([2, text_key, stats]).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _own_index(spec: str, remote: Remote) -> str | None:
    """The ``index.json`` URL of a folder URL ``spec``, where it exists."""
    if is_pattern(spec) or spec.endswith(".tar"):
        return None
    index = urls.join(spec, INDEX_FILE)
    return index if _is_object(index, remote) else None


def index_location(
    spec: str | Path, text_key: str = "text", beside: bool = True, remote: Remote | None = None
) -> Path | str:
    """Where the index of ``spec`` is, or would be built (module docstring)."""
    remote = remote or Remote()
    if is_url(spec) and _own_index(str(spec), remote):
        return _own_index(str(spec), remote)
    paths = expand(spec, remote)
    if is_url(spec):
        return cache_dir() / f"index-{_cache_key(paths, text_key, remote)}.json"
    own = _local_path(str(spec))
    if not is_pattern(spec) and own.is_dir():
        if (own / INDEX_FILE).is_file() and load_index(own, check=False).text_key == text_key:
            return own / INDEX_FILE
        if beside and text_key == "text" and os.access(own, os.W_OK):
            return own / INDEX_FILE
    return cache_dir() / f"index-{_cache_key(paths, text_key, remote)}.json"


def _base_dir(paths: list[Path] | list[str]) -> Path | str:
    if is_url(paths[0]):
        return urls.common_base(paths)
    if len(paths) == 1:
        return paths[0].parent
    return Path(os.path.commonpath([str(p.absolute()) for p in paths]))


def _names(directory: Path | str, paths: list) -> list[str]:
    if is_url(directory):
        return [urls.relative(u, directory) for u in paths]
    return [os.path.relpath(p, directory) for p in paths]


def _valid(
    where: Path, directory: Path | str, paths: list, text_key: str, remote: Remote | None = None
) -> ShardSet | None:
    """The index at ``where`` if it indexes ``paths`` with ``text_key`` as they are now, else
    None. An index lists the shards it was built from: one that lacks a shard now present is
    rebuilt (shards added later), as is an automatic one with shards changed since; shards gone
    since are read as missing (``missing_shard``). A user's stale index raises."""
    if not where.is_file():
        return None
    shard_set = load_index(directory, where, remote)
    names = {s["name"] for s in shard_set.shards}
    wanted = _names(directory, paths)
    if shard_set.text_key != text_key or shard_set.stale or any(n not in names for n in wanted):
        return None
    return shard_set


def _reusable(where: Path, directory: Path | str, text_key: str, remote, progress: bool) -> dict:
    """name -> entry of the index at ``where`` for the shards unchanged since it was built; with
    ``progress``, one line names the changed ones."""
    if not where.is_file():
        return {}
    old = load_index(directory, where, remote)
    if old.text_key != text_key:
        return {}
    if old.stale and progress:
        listed = ", ".join(f"{n} ({what})" for n, what in list(old.stale.items())[:3])
        more = f" and {len(old.stale) - 3} more" if len(old.stale) > 3 else ""
        print(f"{where}: {len(old.stale)} of {len(old.shards)} shards changed since they were "
              f"indexed, re-indexing them: {listed}{more}", file=sys.stderr, flush=True)  # fmt: skip
    return {s["name"]: s for s in old.shards if s["name"] not in old.stale}


def _build(directory, paths: list, text_key: str, progress: bool, remote, keep: dict) -> list[dict]:
    """Index entries of ``paths``: those in ``keep`` as they are, the others scanned; local
    entries record the shard's modification time, taken before it is read."""
    names = _names(directory, paths)
    mtimes = {n: p.stat().st_mtime_ns for p, n in zip(paths, names) if not is_url(p)}
    todo = [p for p, n in zip(paths, names) if n not in keep]
    scanned = iter(scan_shards(directory, todo, text_key, progress, remote))
    out = []
    for n in names:
        entry = dict(keep[n]) if n in keep else next(scanned)
        if n in mtimes:
            entry["mtime_ns"] = mtimes[n]
        out.append(entry)
    return out


def open_shards(
    spec: str | Path,
    text_key: str = "text",
    *,
    beside: bool = True,
    progress: bool = True,
    rebuild: bool = False,
    remote: Remote | None = None,
) -> ShardSet:
    """The indexed shards of ``spec``, building the index where it is missing (module docstring),
    or in any case with ``rebuild`` (``make-shards --index-only``: shards rewritten in place);
    ``remote`` says how URLs are reached (default: the storage clients' own settings)."""
    remote = remote or Remote()
    if is_url(spec):
        own_index = None if rebuild else _own_index(str(spec), remote)
        if own_index:
            shard_set = load_index(str(spec).rstrip("/"), own_index, remote)
            if shard_set.text_key == text_key:
                return shard_set
        own = None
    else:
        own = _local_path(str(spec))
        if not rebuild and not is_pattern(spec) and (own / INDEX_FILE).is_file():
            paths = sorted(own.glob("*.tar"))  # may be none: make-shards of an empty input
            shard_set = _valid(own / INDEX_FILE, own, paths, text_key)
            if shard_set is not None:
                return shard_set
    paths = expand(spec, remote)
    directory = _base_dir(paths)
    where = index_location(spec, text_key, beside, remote)
    if is_url(where) or (
        where.name == INDEX_FILE and where.is_file() and not (beside and os.access(own, os.W_OK))
    ):
        # An index on the store, or a stale index.json that may not be rewritten here: build a
        # fresh one in the cache.
        where = cache_dir() / f"index-{_cache_key(paths, text_key, remote)}.json"
    with _locked(where):
        shard_set = None if rebuild else _valid(where, directory, paths, text_key, remote)
        if shard_set is None:
            keep = {} if rebuild else _reusable(where, directory, text_key, remote, progress)
            shards = _build(directory, paths, text_key, progress, remote, keep)
            write_index(directory, shards, text_key, path=where, auto=not rebuild)
            shard_set = load_index(directory, where, remote)
        return shard_set
