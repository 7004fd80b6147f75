"""Shards written to object storage: ``omni-ds make-shards INPUT --out s3://bucket/prefix``.

    summary = upload_shards(records, "s3://bucket/train", Remote(), problems=problems)

The store ends up with the bytes :func:`data_pipeline.shards.make_shards` writes into a local
directory (shards, ``report.jsonl``, ``index.json``), put there with fsspec through
:meth:`Remote.call`, the readers' client (``data_pipeline.remote``: the same credentials, the same
``--endpoint-url``, the same retries with backoff, counted alike):

- each worker builds one shard at a time in a local staging directory (under ``$TMPDIR``),
  uploads it once complete and deletes it: the disk holds at most ``workers`` shards, never the
  corpus;
- then the shard's part ``PREFIX/.parts/<shard>.json`` (its index entry and report lines): a
  shard whose part is there, at the size the part records, is complete, and a rerun skips it
  without downloading it;
- ``report.jsonl``, and ``index.json`` last: a reader never finds an index naming a shard that is
  not there. A permanent failure (no such bucket, access denied, retries exhausted) raises
  ``FileNotFoundError`` naming the URL, before any index is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from data_pipeline.index import INDEX_FILE, scan_shard, write_index
from data_pipeline.manifests import Problem, Record
from data_pipeline.remote import Remote, join, redact
from data_pipeline.shards import (
    PARTS_DIR,
    REPORT_FILE,
    ShardSummary,
    build_shard,
    group_records,
    problem_lines,
    run_jobs,
    shard_name,
)


def check_writable(url: str, remote: Remote) -> None:
    """Refuse, before any work, a URL that cannot take the shards (the message says the fix)."""
    parts = urlsplit(url)
    if parts.password or parts.query:
        raise ValueError(f"{redact(url)}: never put credentials in a URL; use "
                         "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials")  # fmt: skip
    if parts.scheme in ("http", "https"):
        raise ValueError(f"{redact(url)}: a web server takes no uploads here; write to s3:// "
                         "or to a local directory and publish that")  # fmt: skip
    if parts.scheme in ("s3", "s3a"):
        bucket = f"{parts.scheme}://{parts.hostname}"
        try:
            remote.call(bucket, "info", bucket)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{redact(url)}: bucket {parts.hostname} does not exist or these credentials "
                f"cannot reach it; create it (aws s3 mb {bucket}) or check --endpoint-url and "
                "the AWS credentials"
            ) from None


@dataclasses.dataclass(frozen=True)
class _Job:
    url: str
    remote: Remote
    staging: Path
    name: str
    records: list[Record]


def _complete(shard: str, part: str, remote: Remote) -> dict | None:
    """The part of ``shard`` when the shard is on the store at the size the part records; None
    (build it again) when either is missing or the part is damaged."""
    try:
        done = json.loads(remote.cat(part))
        complete = remote.call(shard, "info", shard)["size"] == done["entry"]["bytes"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return done if complete else None


def _put_shard(job: _Job) -> tuple[dict, bool, str]:
    """(index entry, written now, report lines) of one shard, built and uploaded if missing."""
    shard = join(job.url, job.name)
    part = join(job.url, f"{PARTS_DIR}/{job.name}.json")
    done = _complete(shard, part, job.remote)
    if done is not None:
        return done["entry"], False, done["report"]
    local = job.staging / job.name
    report = build_shard(local, job.records)
    entry = scan_shard(local)
    job.remote.call(shard, "put_file", str(local), shard)
    local.unlink()
    text = json.dumps({"entry": entry, "report": report}, ensure_ascii=False)
    job.remote.call(part, "pipe_file", part, text.encode())
    return entry, True, report


def upload_shards(
    records: Sequence[Record],
    url: str,
    remote: Remote,
    *,
    problems: Sequence[Problem] = (),
    shard_size: int | None = 1000,
    shard_bytes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Shard ``records`` onto the store at ``url`` (see the module docstring)."""
    url = url.rstrip("/")
    check_writable(url, remote)
    groups = group_records(records, shard_size, shard_bytes)
    with tempfile.TemporaryDirectory(prefix="omni-ds-shards-") as tmp:
        staging = Path(tmp)
        jobs = [_Job(url, remote, staging, shard_name(i), g) for i, g in enumerate(groups)]
        results = run_jobs(_put_shard, jobs, workers or os.cpu_count() or 1, "shards", progress)
        index = [entry for entry, _, _ in results]
        lines = problem_lines(problems) + "".join(report for _, _, report in results)
        report_url, index_url = join(url, REPORT_FILE), join(url, INDEX_FILE)
        remote.call(report_url, "pipe_file", report_url, lines.encode())
        remote.call(index_url, "put_file", str(write_index(staging, index)), index_url)
    return ShardSummary.of(url, index, sum(w for _, w, _ in results), lines)
