"""The epoch plan: which utterances form which batch, on which rank, at which step.

Every rank computes the same plan from the shard indexes, the seed and the epoch, so ranks agree
without a collective:

1. Filters run on index metadata (duration, characters per second, pseudo-label confidence);
   samples the index already marked bad are counted too.
2. The kept utterances are shuffled and split into ``num_buckets`` duration buckets (equal-count
   quantiles). Each bucket is packed greedily into batches whose padded length
   (longest × count) stays within the frame budget.
3. A bucket's batch count must be a multiple of the world size W, so that one step gives every
   rank a batch of the same bucket: the few batches over a multiple move on to the next (longer)
   bucket; in the last bucket the largest batches are split until the count is a multiple of W.
4. Batches are grouped W per step and the steps shuffled. Rank r takes batch r of every step, so
   every rank has the same number of steps whatever the shard count.

Resuming on another world size: an epoch is a chain of *segments* ``[W, steps_done]``; a new
segment plans only the samples that earlier segments had not yet consumed, so no sample of the
epoch is lost or repeated.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.index import (
    AUDIO_OFF,
    AUDIO_SIZE,
    CHARS,
    CONFIDENCE,
    JSON_OFF,
    JSON_SIZE,
    KEY,
    LABEL_EXT,
    SECONDS,
    ShardSet,
)

FILTER_REASONS = ("too_short", "too_long", "chars_per_second", "low_confidence")


@dataclasses.dataclass
class Catalog:
    """Every indexed sample of some shard sets, as columns (global sample ids in index order).

    Columns rather than row objects: a million utterances cost ~60 MB, and forked loader
    workers share the arrays instead of copying them page by page as refcounts change.
    """

    shard_paths: list[str]
    keys: list[str]
    shard_of: np.ndarray
    """int32 [N]: which shard (index into ``shard_paths``) holds sample i."""
    seconds: np.ndarray
    chars: np.ndarray
    confidence: np.ndarray
    """float64 [N]; NaN where the label has no ``pl_confidence``."""
    members: np.ndarray
    """int64 [N, 4]: audio offset, audio size, JSON offset, JSON size inside the tar."""
    bad: list[tuple[int, str, str]]
    """(shard id, key, reason) of samples the index marked unusable."""
    label_txt: np.ndarray
    """bool [N]: the label is a ``.txt`` member (else JSON)."""
    text_keys: list[str]
    """Per shard: the JSON key of the transcript."""
    remotes: list
    """Per shard: how its URL is reached (``data_pipeline.remote.Remote``), None for a file."""

    @classmethod
    def from_sets(cls, sets: list[ShardSet]) -> Catalog:
        paths, shard_of, rows, bad, text_keys, remotes = [], [], [], [], [], []
        for shard_set in sets:
            for shard in shard_set.shards:
                sid = len(paths)
                paths.append(str(shard_set.path(shard["name"])))
                text_keys.append(shard_set.text_key)
                remotes.append(shard_set.remote)
                rows.extend(shard["samples"])
                shard_of.extend([sid] * len(shard["samples"]))
                bad.extend((sid, key, reason) for key, reason in shard["bad"])

        def column(k: int, dtype) -> np.ndarray:
            return np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=dtype)

        members = np.stack(
            [column(k, np.int64) for k in (AUDIO_OFF, AUDIO_SIZE, JSON_OFF, JSON_SIZE)], axis=1
        ) if rows else np.zeros((0, 4), np.int64)  # fmt: skip
        return cls(
            shard_paths=paths,
            keys=[r[KEY] for r in rows],
            shard_of=np.array(shard_of, dtype=np.int32),
            seconds=column(SECONDS, np.float64),
            chars=column(CHARS, np.int64),
            confidence=column(CONFIDENCE, np.float64),
            members=members,
            bad=bad,
            label_txt=np.array([len(r) > LABEL_EXT and r[LABEL_EXT] == "txt" for r in rows], bool),
            text_keys=text_keys,
            remotes=remotes,
        )

    def __len__(self) -> int:
        return len(self.keys)


def filter_reasons(catalog: Catalog, cfg: DataConfig) -> np.ndarray:
    """Per sample: the index of its reason in :data:`FILTER_REASONS`, or -1 to keep it."""
    seconds = np.maximum(catalog.seconds, 1e-9)
    cps = catalog.chars / seconds
    checks = [
        catalog.seconds < cfg.min_duration,
        catalog.seconds > cfg.max_duration,
        (cps > cfg.max_chars_per_second if cfg.max_chars_per_second else False)
        | (cps < cfg.min_chars_per_second),
        catalog.confidence < cfg.min_pl_confidence,  # NaN (no confidence) compares False
    ]
    reason = np.full(len(catalog), -1)
    for k in reversed(range(len(checks))):  # the first failing check names the reason
        reason[np.broadcast_to(checks[k], reason.shape)] = k
    return reason


def apply_filters(catalog: Catalog, cfg: DataConfig) -> tuple[np.ndarray, list[str]]:
    """(kept sample ids, the reason of every filtered or index-bad sample, in index order)."""
    codes = filter_reasons(catalog, cfg)
    reasons = [reason for _, _, reason in catalog.bad]
    reasons += [FILTER_REASONS[c] for c in codes[codes >= 0]]
    return np.flatnonzero(codes < 0), reasons


def pack(ids, seconds: np.ndarray, budget: float, max_size: float) -> list[list[int]]:
    """Consecutive ``ids`` into batches while longest × count stays within ``budget`` seconds
    and count within ``max_size``; a sample longer than the budget gets a batch of its own."""
    batches: list[list[int]] = []
    longest = 0.0
    for i in ids:
        d = seconds[i]
        n = len(batches[-1]) if batches else 0
        if n and max(longest, d) * (n + 1) <= budget and n < max_size:
            batches[-1].append(i)
            longest = max(longest, d)
        else:
            batches.append([i])
            longest = d
    return batches


@dataclasses.dataclass
class SegmentPlan:
    steps: list[list[list[int]]]
    """steps[s][r]: the sample ids of rank r's batch at step s."""
    buckets: list[int]
    """The duration bucket of each step."""
    dropped: list[int]
    """Samples no equal split could place (only when fewer remain than ranks)."""


def plan_segment(
    ids: np.ndarray, seconds: np.ndarray, world_size: int, cfg: DataConfig, rng
) -> SegmentPlan:
    """Pack ``ids`` into steps of ``world_size`` same-bucket batches (module docstring, 2-4)."""
    if len(ids) == 0:
        return SegmentPlan([], [], [])
    order = rng.permutation(ids)
    d = seconds[order]
    edges = np.quantile(d, np.linspace(0, 1, cfg.num_buckets + 1)[1:-1])
    bucket_of = np.searchsorted(edges, d, side="right")
    steps, buckets, carry, dropped = [], [], [], []
    for b in range(cfg.num_buckets):
        members = carry + order[bucket_of == b].tolist()
        batches = pack(members, seconds, cfg.max_batch_seconds, cfg.max_batch_size)
        carry = []
        if b < cfg.num_buckets - 1:
            extra = len(batches) % world_size
            if extra:
                carry = [i for batch in batches[-extra:] for i in batch]
                batches = batches[:-extra]
        else:
            while len(batches) % world_size and max(map(len, batches), default=1) > 1:
                big = max(range(len(batches)), key=lambda k: len(batches[k]))
                half = len(batches[big]) // 2
                batches[big : big + 1] = [batches[big][:half], batches[big][half:]]
            extra = len(batches) % world_size
            if extra:
                dropped = [i for batch in batches[-extra:] for i in batch]
                batches = batches[:-extra]
        for s in range(0, len(batches), world_size):
            steps.append(batches[s : s + world_size])
            buckets.append(b)
    perm = rng.permutation(len(steps))
    return SegmentPlan([steps[p] for p in perm], [buckets[p] for p in perm], dropped)


def plan_epoch(
    kept: np.ndarray,
    seconds: np.ndarray,
    cfg: DataConfig,
    seed: int,
    epoch: int,
    segments: list[list[int]],
) -> SegmentPlan:
    """The plan of the last segment of ``segments`` (``[[world_size, steps_done], ...]``)."""
    remaining = kept
    for j, (world_size, done) in enumerate(segments):
        rng = np.random.default_rng([seed, epoch, j])
        plan = plan_segment(remaining, seconds, world_size, cfg, rng)
        if j == len(segments) - 1:
            return plan
        consumed = [i for step in plan.steps[:done] for batch in step for i in batch]
        remaining = remaining[~np.isin(remaining, consumed)]
    raise ValueError("segments must not be empty")


def share_of_rank(reasons: list[str], rank: int, world_size: int) -> Counter:
    """Rank ``rank``'s share of globally counted skips (each counted on exactly one rank)."""
    return Counter(reasons[rank::world_size])
