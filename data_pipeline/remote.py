"""Shards on object storage or a web server: fsspec URLs (``s3://``, ``https://``, ``http://``).

A shard is read the way a local one is, by byte offset: one HTTP range request per sample (its
audio and label members are adjacent in the tar, so one request covers both), all the requests
of a batch in flight at once (:meth:`Remote.cat_ranges`). A node-local shard
cache was measured against it (``benchmarks/remote_loader.py``, docs/benchmarks.md): the loader
visits samples in a corpus-wide shuffled order, so a cache smaller than the corpus fetches a
whole shard for almost every sample, and range reads were the faster choice.

Credentials and endpoints come from where the storage's own client looks: for S3, botocore's
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``~/.aws/credentials`` and ``~/.aws/config``, including their ``endpoint_url``, and
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``), plus :attr:`Remote.endpoint_url`
(``data.endpoint_url``, ``--endpoint-url``) for an S3-compatible store. None of them is ever
logged or written: messages name a URL without its user info and query (:func:`redact`).

A transient failure (timeout, HTTP 5xx or throttling, a dropped or refused connection) is retried
with exponential backoff, up to :attr:`Remote.retries` times, and counted (:func:`retry_count`);
a permanent one (no such object, access denied, retries exhausted) raises ``FileNotFoundError``,
which the readers count as ``missing_shard``, as for a local file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import posixpath
import re
import sys
import time
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_RETRIED = [0]  # this process's transient failures retried, read by the batch readers
IN_FLIGHT = 32
"""Range requests of one batch in flight at once (per loader worker)."""


def is_url(spec) -> bool:
    return bool(_URL.match(str(spec)))


def redact(url: str) -> str:
    """``url`` without user info or query (a password or a signature never reaches a log)."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0]


def relative(url: str, base: str) -> str:
    return url[len(base.rstrip("/")) + 1 :]


def common_base(urls: list[str]) -> str:
    """The longest folder URL that holds every URL of ``urls`` (one scheme and host)."""
    if len(urls) == 1:
        return parent(urls[0])
    scheme = _URL.match(urls[0]).group(0)
    rest = [u[len(scheme) :] for u in urls]
    return scheme + posixpath.commonpath(rest)


def retry_count() -> int:
    """Transient failures this process has retried so far."""
    return _RETRIED[0]


@dataclasses.dataclass(frozen=True)
class Remote:
    """How URLs are reached; picklable, so loader workers open shards the same way."""

    endpoint_url: str = ""
    """S3-compatible store (MinIO, Ceph, moto...): its endpoint, e.g. ``http://host:9000``;
    empty: botocore's own (AWS, or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/the AWS config)."""
    timeout: float = 30.0
    """Seconds one request may take before it counts as a transient failure."""
    retries: int = 6
    """Retries of a transient failure (backoff 0.25 s doubling, at most 8 s) before giving up."""

    def filesystem(self, url: str):
        return _filesystem(_URL.match(url).group(1), self, os.getpid())

    def cat(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``url`` (the whole object when both are None)."""
        return self.call(url, "cat_file", url, start=start, end=end)

    def call(self, url: str, method: str, *args, failed: Exception | None = None, **kwargs):
        """``filesystem(url).method(*args, **kwargs)`` with the module docstring's retries;
        ``failed``: the first attempt was made elsewhere and raised it."""
        fs = self.filesystem(url)
        delay = 0.25
        for attempt in range(self.retries + 1):
            try:
                if failed is not None and attempt == 0:
                    raise failed
                return getattr(fs, method)(*args, **kwargs)
            except Exception as e:  # classified below: storage clients raise many types
                status = _status(e)
                if status == 416:  # a range past the end: no bytes (the readers: cut short)
                    return b""
                if not _transient(e, status):
                    if isinstance(e, FileNotFoundError | PermissionError) or status:
                        raise FileNotFoundError(
                            f"{redact(url)}: {type(e).__name__} (HTTP {status})"
                        ) from None
                    raise
                if attempt == self.retries:
                    raise FileNotFoundError(
                        f"{redact(url)}: unreachable after {self.retries} retries "
                        f"({type(e).__name__})"
                    ) from None
                _RETRIED[0] += 1
                print(f"{redact(url)}: {type(e).__name__}, retry {attempt + 1} of "
                      f"{self.retries} in {delay:.2f} s", file=sys.stderr)  # fmt: skip
                time.sleep(delay)
                delay = min(2 * delay, 8.0)
        raise AssertionError("unreachable")

    def cat_ranges(self, url_list: list[str], starts: list[int], ends: list[int]) -> list:
        """:meth:`cat` of each range, all requests in flight at once (a batch costs about one
        round trip); a range that fails is retried alone. Each item is the bytes, or the
        ``FileNotFoundError`` that ended its retries."""
        fs = self.filesystem(url_list[0])
        try:
            out = fs.cat_ranges(url_list, starts, ends, on_error="return", batch_size=IN_FLIGHT)
        except Exception as e:  # the batch as a whole failed: every range is retried alone
            out = [e] * len(url_list)
        for k, got in enumerate(out):
            if isinstance(got, BaseException):
                url = url_list[k]
                try:
                    out[k] = self.call(url, "cat_file", url, start=starts[k], end=ends[k],
                                       failed=got)  # fmt: skip
                except FileNotFoundError as e:
                    out[k] = e
        return out


def _status(e: BaseException) -> int | None:
    """The HTTP status of a failed request: aiohttp's, or botocore's under s3fs's OSError."""
    for err in (e, e.__cause__):
        status = getattr(err, "status", None)
        if isinstance(status, int):
            return status
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _transient(e: BaseException, status: int | None) -> bool:
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(e, TimeoutError | asyncio.TimeoutError | ConnectionError):
        return True
    module = type(e).__module__.split(".")[0]
    if module in ("aiohttp", "botocore", "aiobotocore", "urllib3"):
        return True  # connection, protocol and read errors of the HTTP clients
    return isinstance(e, OSError)  # socket-level failures the clients pass on as OSError


_CACHE: dict = {}


def _filesystem(protocol: str, remote: Remote, pid: int):
    key = (protocol, remote, pid)  # a forked worker makes its own clients
    if key not in _CACHE:
        import fsspec

        if protocol in ("s3", "s3a"):
            client = {"endpoint_url": remote.endpoint_url} if remote.endpoint_url else {}
            fs = fsspec.filesystem(
                "s3",
                client_kwargs=client,
                config_kwargs={
                    "retries": {"total_max_attempts": 1},
                    "connect_timeout": remote.timeout,
                    "read_timeout": remote.timeout,
                },
                skip_instance_cache=True,
            )
            fs.retries = 1  # one layer of retries, ours, so that every retry is counted
        elif protocol in ("http", "https"):
            import aiohttp

            fs = fsspec.filesystem(
                protocol,
                client_kwargs={"timeout": aiohttp.ClientTimeout(total=remote.timeout)},
                skip_instance_cache=True,
            )
        else:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        _CACHE[key] = fs
    return _CACHE[key]
