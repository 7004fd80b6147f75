"""Paired bootstrap confidence intervals for the WER (or CER) difference of two systems.

Bisani & Ney, "Bootstrap estimates for confidence intervals in ASR performance evaluation"
(ICASSP 2004): resample the utterances of a test set with replacement, recompute both systems'
corpus-level error rate on the *same* resample, and take the 2.5 and 97.5 percentiles of the
difference over many replicates. Pairing removes the utterances' shared difficulty from the
noise, so the interval is much narrower than two independent ones.

A system here may be a group of runs of one recipe with different seeds: its rate is the mean of
the seeds' rates. Each replicate then also resamples the group's seeds with replacement (the same
drawn seeds on every set), so the interval covers seed-to-seed variation besides test-set
sampling; with one run per system it is exactly Bisani & Ney's. With 3 seeds the seed part is a
rough estimate (a bootstrap of 3 values understates their spread by a factor of about 0.8).

The mean over sets (the report's average) gets its interval the same way: per replicate, every
set is resampled independently and the per-set rates averaged. A difference is *significant at
95%* when its interval excludes 0.

    reps = Replicates.draw(groups, "wer", sets=["noisy", "fast"], mean_sets=["noisy", "fast"])
    reps.interval("switch", "omni", "mean")      # omni - switch: diff, low, high
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MEAN = "mean"
"""The key of the mean over ``mean_sets`` next to the set names."""


@dataclasses.dataclass(frozen=True)
class Interval:
    """``diff`` = rate(b) - rate(a) (negative: b is better) and its 95% bootstrap interval."""

    diff: float
    low: float
    high: float
    p_better: float
    """Share of replicates in which b's rate is lower than a's (Bisani & Ney's "probability of
    improvement")."""

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def _counts(report, set_name: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    u = report.utterances.get(set_name)
    if u is None:
        raise ValueError(f"{report.model}: no per-utterance counts for {set_name!r}; score it "
                         "with score_utterances")  # fmt: skip
    if metric == "wer":
        return np.asarray(u.word_errors, float), np.asarray(u.ref_words, float)
    if metric == "cer":
        return np.asarray(u.char_errors, float), np.asarray(u.ref_chars, float)
    raise ValueError(f"metric {metric!r}: use wer or cer")


@dataclasses.dataclass
class Replicates:
    """Each group's rate per set (and on the mean) in the data and in every replicate."""

    point: dict[str, dict[str, float]]
    """``{group: {set or MEAN: seed-mean rate}}`` on the data as it is."""
    samples: dict[str, dict[str, np.ndarray]]
    """The same per bootstrap replicate (arrays of length ``n``)."""

    @classmethod
    def draw(
        cls,
        groups: dict[str, Sequence],
        metric: str,
        sets: Sequence[str],
        mean_sets: Sequence[str],
        n: int = 1000,
        seed: int = 0,
    ) -> Replicates:
        """``groups``: name -> the reports of its runs (EvalReports with per-utterance counts),
        all scored on the same utterances of ``sets`` in the same order."""
        if n < 1:
            raise ValueError(f"bootstrap samples: {n} < 1")
        rng = np.random.default_rng(seed)
        # Seed resampling weights per group, shared by all sets of a replicate.
        weights = {}
        for g, runs in groups.items():
            k = len(runs)
            draws = rng.integers(0, k, size=(n, k)) if k > 1 else np.zeros((n, 1), int)
            weights[g] = np.stack([np.bincount(d, minlength=k) / k for d in draws])
        point: dict[str, dict[str, float]] = {g: {} for g in groups}
        samples: dict[str, dict[str, np.ndarray]] = {g: {} for g in groups}
        for s in sets:
            per_group = {g: [_counts(r, s, metric) for r in runs] for g, runs in groups.items()}
            refs = next(iter(per_group.values()))[0][1]
            for g, counts in per_group.items():
                for errors, r in counts:
                    if errors.shape != refs.shape or not np.array_equal(r, refs):
                        raise ValueError(f"set {s!r}: group {g} was not scored on the same "
                                         "utterances (references differ); pair the same sets")  # fmt: skip
            idx = rng.integers(0, len(refs), size=(n, len(refs)))
            denom = refs[idx].sum(axis=1)
            for g, counts in per_group.items():
                errors = np.stack([e for e, _ in counts])  # [seeds, utterances]
                point[g][s] = float(errors.sum(axis=1).mean() / refs.sum())
                by_utt = weights[g] @ errors  # [replicates, utterances]: seed-mean errors
                samples[g][s] = np.take_along_axis(by_utt, idx, axis=1).sum(axis=1) / denom
        for g in groups:
            point[g][MEAN] = float(np.mean([point[g][s] for s in mean_sets]))
            samples[g][MEAN] = np.mean([samples[g][s] for s in mean_sets], axis=0)
        return cls(point, samples)

    def interval(self, a: str, b: str, key: str = MEAN, level: float = 0.95) -> Interval:
        """rate(b) - rate(a) on ``key`` (a set name or MEAN) with its ``level`` interval."""
        d = self.samples[b][key] - self.samples[a][key]
        tail = (1 - level) / 2
        low, high = np.quantile(d, [tail, 1 - tail])
        diff = self.point[b][key] - self.point[a][key]
        return Interval(diff, float(low), float(high), float(np.mean(d < 0)))

    def pairs(self, keys: Sequence[str]) -> dict[tuple[str, str], dict[str, Interval]]:
        """Every pair (a, b), a listed before b: ``{(a, b): {key: interval of b - a}}``."""
        names = list(self.point)
        return {(a, b): {k: self.interval(a, b, k) for k in keys}
                for i, a in enumerate(names) for b in names[i + 1 :]}  # fmt: skip
