"""Checksums of checkpoint files: recorded in the manifest at save, verified before any load.

The manifest's size check only catches truncation; a flipped byte inside an optimizer shard keeps
the size and loads silently. So every file gets an xxh3-128 digest (``xxhash``; about 10 GB/s
on one core, far above any disk, where sha256 does about 1 GB/s and blake2b about 0.4 GB/s;
docs/benchmarks.md has the save and verify costs). It is a corruption check, not a signature:
someone who can write the checkpoint can rewrite the manifest too, which is why loading is
also restricted (:mod:`omni_ds.ckpt.safe_load`).

Digests are computed by the rank that wrote a file, right after writing it (the bytes are still
in the page cache), and the file is fsynced at the same time, so that a manifest never outlives
the data it describes on a power loss (:mod:`omni_ds.ckpt.engine_io`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

HASH = "xxh3_128"
"""The manifest key of a file's digest."""
SELF = "manifest_xxh3_128"
"""The manifest key of the digest of the manifest itself (all its other keys, sorted JSON), so
that a changed step or size that still parses is caught too."""
CHUNK = 8 << 20


def manifest_digest(manifest: dict) -> str:
    text = json.dumps({k: v for k, v in manifest.items() if k != SELF}, sort_keys=True)
    return xxhash.xxh3_128(text.encode()).hexdigest()


def file_digest(path: Path, fsync: bool = False) -> tuple[int, str]:
    """``(size, xxh3-128 hex digest)`` of ``path``, streamed; with ``fsync`` the file's data is
    also forced to disk."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def file_problem(path: Path, entry) -> str | None:
    """What is wrong with ``path`` against its manifest ``entry`` (a size, in manifests written
    before checksums, or ``{"size", HASH}``), or None when it matches."""
    size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get(HASH))
    if not path.is_file():
        return f"{path} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path} has {actual} bytes, the manifest recorded {size} (truncated or rewritten)"
    if digest is not None and file_digest(path)[1] != digest:
        return f"{path} does not match its checksum (its bytes changed after the save)"
    return None


def problems(tag_dir: Path, files: dict, names: list[str] | None = None) -> list[str]:
    """Every file of ``files`` (a manifest's ``files``; only ``names`` of them if given) that
    does not verify, each as one line."""
    out = []
    for name in sorted(files) if names is None else names:
        problem = file_problem(tag_dir / name, files[name])
        if problem is not None:
            out.append(problem)
    return out
