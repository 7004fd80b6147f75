"""Write WebDataset tar shards: ``<key>.flac`` (16 kHz mono 16-bit) + ``<key>.json`` per sample.

    records, problems = read_input("train.jsonl")          # data_pipeline.manifests
    summary = make_shards(records, Path("shards/train"), problems=problems, shard_size=1000)

Shard membership is fixed from the record order before any audio is read, so the output is the
same bytes whatever the number of workers, and a rerun skips shards already on disk (each is
written to a temporary name and renamed when complete). Inputs that cannot be read are listed in
``DIR/report.jsonl`` with the reason; ``DIR/index.json`` is written last (``data_pipeline.index``).

An array job (``omni-ds make-shards ... --task I --tasks N``, ``slurm/make_shards.sbatch``) splits
the same layout: :func:`make_shards_task` ``I`` of ``N`` writes shards I, I+N, I+2N, ..., and the
task that finds all N done (under a file lock) finishes with :func:`make_shards` itself, which
only scans the shards now on disk and writes ``index.json`` and ``report.jsonl``: the result is
byte-identical to the one-machine command. A requeued or rerun task skips complete shards.

Shards for object storage (``--out s3://...``) are written by ``data_pipeline.upload``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.audio import (
    FULL_SCALE,
    SAMPLE_RATE,
    AudioError,
    encode_flac,
    file_seconds,
    read_file,
    reject_silence,
)
from data_pipeline.index import scan_shard, write_index
from data_pipeline.manifests import Problem, Record

REPORT_FILE = "report.jsonl"
PARTS_DIR = ".parts"
"""Each complete shard's report lines (on a store, with its index entry: ``data_pipeline.upload``)."""
DONE_DIR = ".array"
"""Per-task completion markers of array jobs, ``DIR/.array/<job>.<task>-of-<tasks>``: a later
array job over the same directory waits for its own tasks, not for markers left by an earlier
one."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[tuple[str, np.ndarray, dict]]) -> None:
    """Write ``(key, int16 16 kHz pcm, label)`` samples to ``path`` atomically.

    The label must hold ``text``; ``duration`` and ``sample_rate`` are added.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, pcm, label in samples:
            label = {
                **label,
                "duration": round(len(pcm) / SAMPLE_RATE, 4),
                "sample_rate": SAMPLE_RATE,
            }
            _add(tar, f"{key}.flac", encode_flac(pcm))
            _add(tar, f"{key}.json", json.dumps(label, ensure_ascii=False, sort_keys=True).encode())
    tmp.replace(path)


def _estimated_bytes(r: Record) -> int:
    # Raw 16-bit PCM bytes; FLAC shards come out at roughly half of it for speech.
    try:
        duration = file_seconds(r.path, r.start, r.duration, r.member)
    except AudioError:
        duration = 0.0
    return int(duration * SAMPLE_RATE * 2)


def group_records(
    records: Sequence[Record], shard_size: int | None, shard_bytes: int | None
) -> list[list[Record]]:
    """Consecutive records per shard: at most ``shard_size`` each, or about ``shard_bytes``."""
    if shard_bytes is None:
        size = shard_size or 1000
        return [list(records[i : i + size]) for i in range(0, len(records), size)]
    groups: list[list[Record]] = [[]]
    used = 0
    for r in records:
        n = _estimated_bytes(r)
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(r)
        used += n
    return [g for g in groups if g]


def problem_lines(problems: Iterable[Problem]) -> str:
    return "".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in problems)


def build_shard(path: Path, records: Sequence[Record]) -> str:
    """Write the shard of ``records`` to ``path``; returns its ``report.jsonl`` lines (the
    records left out, with the reason)."""
    problems: list[Problem] = []

    def samples():
        for r in records:
            if not r.text.strip():
                problems.append(Problem(r.key, r.path, "empty_text", "empty transcript"))
                continue
            try:
                pcm, gain = read_file(r.path, r.start, r.duration, r.channel, r.member)
                reject_silence(pcm, r.path)
            except AudioError as e:
                problems.append(Problem(r.key, r.path, e.reason, str(e)))
                continue
            label = {"text": r.text, **r.meta}
            if gain != 1.0:  # the sample is kept, changed: say so, and record how in its label
                label["gain"] = round(gain, 6)
                print(f"make-shards: {r.key} ({r.path}): float audio above full scale (peak "
                      f"{FULL_SCALE / gain:.3g}), stored scaled by its label's gain {gain:.4g} "
                      "instead of clipped", file=sys.stderr, flush=True)  # fmt: skip
            yield r.key, pcm, label

    write_shard(path, samples())
    return problem_lines(problems)


def _build_shard(job: tuple[Path, list[Record]]) -> tuple[dict, bool]:
    path, records = job
    part = path.parent / PARTS_DIR / f"{path.name}.report.jsonl"
    if path.is_file() and part.is_file():
        return scan_shard(path), False
    part.write_text(build_shard(path, records))
    return scan_shard(path), True


def run_jobs(fn: Callable, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """``[fn(job) for job in jobs]`` over ``workers`` processes, in order, with a progress bar."""
    from data_pipeline.progress import progress_bar

    workers = max(1, min(workers, len(jobs)))
    bar = progress_bar(len(jobs), desc, "shard", progress)
    results = []
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else _Serial() as pool:
        for result in pool.imap(fn, jobs):
            results.append(result)
            bar.update(1)
    bar.close()
    return results


class _Serial:
    """``Pool.imap`` in this process (no fork for a single worker)."""

    def imap(self, fn, jobs):
        return map(fn, jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@dataclasses.dataclass
class ShardSummary:
    out: Path | str
    """The shard directory, or the URL (``data_pipeline.upload``)."""
    shards: int
    written: int
    """Shards written by this run (the others were already complete)."""
    samples: int
    hours: float
    problems: int
    """Inputs left out, listed in ``report.jsonl``."""

    @classmethod
    def of(cls, out: Path | str, index: list[dict], written: int, report: str) -> ShardSummary:
        """The summary of the shards of ``index`` and the ``report.jsonl`` text ``report``."""
        return cls(out=out, shards=len(index), written=written,
                   samples=sum(e["num_samples"] for e in index),
                   hours=sum(e["duration"] for e in index) / 3600,
                   problems=report.count("\n"))  # fmt: skip


def _shard_jobs(
    records: Sequence[Record], out: Path, shard_size: int | None, shard_bytes: int | None
) -> list[tuple[Path, list[Record]]]:
    """(shard path, its records) of every shard of ``out``, which is created."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS_DIR).mkdir(exist_ok=True)
    groups = group_records(records, shard_size, shard_bytes)
    return [(out / shard_name(i), g) for i, g in enumerate(groups)]


def make_shards(
    records: Sequence[Record],
    out: Path,
    *,
    problems: Sequence[Problem] = (),
    shard_size: int | None = 1000,
    shard_bytes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Shard ``records`` into ``out`` (see the module docstring); returns what was written."""
    jobs = _shard_jobs(records, out, shard_size, shard_bytes)
    results = run_jobs(_build_shard, jobs, workers or os.cpu_count() or 1, "shards", progress)
    index = [entry for entry, _ in results]
    write_index(out, index)
    lines = problem_lines(problems) + "".join(
        (out / PARTS_DIR / f"{path.name}.report.jsonl").read_text() for path, _ in jobs
    )
    (out / REPORT_FILE).write_text(lines)
    return ShardSummary.of(out, index, sum(w for _, w in results), lines)


def make_shards_task(
    records: Sequence[Record],
    out: Path,
    task: int,
    tasks: int,
    *,
    job: str = "local",
    problems: Sequence[Problem] = (),
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> bool:
    """Write array task ``task``'s shards (module docstring); True when this call also wrote
    the index and report, i.e. every task of ``job`` is done."""
    if not 0 <= task < tasks:
        raise ValueError(f"task {task} is not in 0..{tasks - 1}")
    jobs = _shard_jobs(records, out, shard_size, shard_bytes)
    done = out / DONE_DIR
    done.mkdir(exist_ok=True)
    run_jobs(_build_shard, jobs[task::tasks], workers, f"task {task}/{tasks}", progress)
    (done / f"{job}.{task}-of-{tasks}").touch()
    with open(done / "lock", "w") as lock:
        # Both tasks may finish together: one writes the index, the other then finds it written
        # and rewrites the same bytes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((done / f"{job}.{t}-of-{tasks}").exists() for t in range(tasks)):
            return False
        make_shards(records, out, problems=problems, shard_size=shard_size,
                    shard_bytes=shard_bytes, workers=workers, progress=False)  # fmt: skip
    return True
