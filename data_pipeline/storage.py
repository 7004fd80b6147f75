"""Opening a shard for reads by byte range, whether it is a local file or a URL.

    shard = open_shard("s3://bucket/train/shard-000003.tar", Remote(endpoint_url=...))
    data = shard.read(offset, size)        # exactly ``size`` bytes, or fewer when cut short

The one place the readers (``data_pipeline.reader``, the tokenizer, the index scan) get bytes
from: a local path is an open file (seek + read); a URL (``data_pipeline.remote``) is one range
request per read, retried on transient failures. A shard that is not there raises
``FileNotFoundError`` in both cases.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.remote import Remote, is_url


class LocalShard:
    def __init__(self, path: str | Path):
        self._f = open(path, "rb")

    def read(self, offset: int, size: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(size)

    def close(self) -> None:
        self._f.close()


class RemoteShard:
    def __init__(self, url: str, remote: Remote):
        self.url, self.remote = url, remote

    def read(self, offset: int, size: int) -> bytes:
        if size == 0:
            return b""
        data = self.remote.cat(self.url, offset, offset + size)
        if len(data) > size:
            raise OSError(
                f"{self.url}: the server answered a range request with {len(data)} bytes for "
                f"{size}: it does not honour HTTP Range; serve the shards from one that does"
            )
        return data

    def close(self) -> None:
        pass


def open_shard(path: str | Path, remote: Remote | None = None) -> LocalShard | RemoteShard:
    if is_url(path):
        return RemoteShard(str(path), remote or Remote())
    return LocalShard(path)


def read_all(path: str | Path, remote: Remote | None = None) -> bytes:
    """The whole of a shard or index file."""
    if is_url(path):
        return (remote or Remote()).cat(str(path))
    return Path(path).read_bytes()
