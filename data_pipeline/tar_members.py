"""Members of tar files read by name, for corpora that keep their audio in tars (NeMo tarred).

The member table of a tar (name -> data offset, size) is read once per process from its headers,
so reading N members of one tar costs N seeks, not N header scans.
"""

from __future__ import annotations

import functools
import tarfile


@functools.lru_cache(maxsize=64)
def member_table(path: str) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def member_bytes(path: str, name: str) -> bytes:
    """The data of member ``name`` of the tar at ``path``; FileNotFoundError naming both when
    either is missing."""
    try:
        offset, size = member_table(path)[name]
    except KeyError:
        raise FileNotFoundError(f"file not found: {name} in {path}") from None
    except OSError as e:
        raise FileNotFoundError(f"file not found: {path} ({e.strerror or e})") from None
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member {name} is cut short ({len(data)} of {size} bytes)")
    return data
