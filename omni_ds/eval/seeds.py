"""Runs of one recipe with different seeds as one system: mean ± std, and the pairwise table.

``omni-ds export`` records a ``recipe`` in the model's metadata: a hash of the training setup
without the seed and the paths (model, data settings, DeepSpeed JSON, steps). Models with the
same recipe are one group; a model without one is a group of its own. A group is named after its
members' common name prefix without a trailing seed marker (``L4-omni-s0``, ``L4-omni-s1`` →
``L4-omni``).

    groups = group_reports(reports, recipes)
    print(groups_markdown(groups, "wer"))
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from omni_ds.eval.bootstrap import MEAN, Interval
from omni_ds.eval.wer import EvalReport

_SEED_TAIL = re.compile(r"([-_.]+(seed|s)?)?$")


@dataclasses.dataclass
class Group:
    """The runs of one recipe (one or more seeds)."""

    name: str
    runs: list[EvalReport]

    def values(self, metric: str, key: str = MEAN) -> np.ndarray:
        """Each run's rate on ``key`` (a set name, or MEAN: the run's mean over test sets)."""
        if key == MEAN:
            return np.array([r.mean_wer if metric == "wer" else r.mean_cer for r in self.runs])
        return np.array([getattr(r.sets[key], metric) for r in self.runs])

    def mean_std(self, metric: str, key: str = MEAN) -> tuple[float, float]:
        """Mean over the runs and their sample standard deviation (ddof=1; 0 for one run)."""
        v = self.values(metric, key)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def group_name(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = _SEED_TAIL.sub("", os.path.commonprefix(list(names)))
    return prefix or f"{names[0]}+{len(names) - 1}"


def group_reports(
    reports: Sequence[EvalReport],
    recipes: Sequence[str | None],
    seeds: Sequence[str | None] | None = None,
) -> list[Group]:
    """Groups in the order of their first member; ``recipes[i]`` and ``seeds[i]`` belong to
    ``reports[i]``. A model whose seed its recipe's group already has (the same run exported
    twice) stays on its own: it is no seed replicate."""
    members: dict[object, list[EvalReport]] = {}
    taken: set[tuple[str, str | None]] = set()
    seeds = seeds if seeds is not None else [None] * len(reports)
    for i, (report, recipe, seed) in enumerate(zip(reports, recipes, seeds, strict=True)):
        alone = recipe is None or (seed is not None and (recipe, seed) in taken)
        taken.add((recipe, seed))
        members.setdefault(("model", i) if alone else recipe, []).append(report)
    groups, seen = [], set()
    for runs in members.values():
        name = group_name([r.model for r in runs])
        while name in seen:
            name += "'"
        seen.add(name)
        groups.append(Group(name, runs))
    return groups


def _pm(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def groups_markdown(groups: Sequence[Group], metric: str) -> str:
    """Per group: runs, and the mean ± std over its runs per set and on the mean over test sets."""
    first = groups[0].runs[0]
    names, averaged = list(first.sets), first.averaged
    left_out = [n for n in names if n not in averaged]
    mean_label = "mean" + (f" (without {', '.join(left_out)})" if left_out else "")
    lines = [
        f"{metric.upper()} (%), mean ± std over the seeds of each recipe",
        "",
        "| recipe | runs | " + " | ".join(names) + f" | {mean_label} |",
        "| --- | ---: |" + " ---: |" * (len(names) + 1),
    ]
    for g in groups:
        cells = [_pm(*g.mean_std(metric, k), len(g.runs)) for k in [*names, MEAN]]
        lines.append(f"| `{g.name}` | {len(g.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def interval_cell(iv: Interval) -> str:
    """``-1.23 [-2.10, -0.40] *`` in points; ``*`` when significant at 95%."""
    text = f"{100 * iv.diff:+.2f} [{100 * iv.low:+.2f}, {100 * iv.high:+.2f}]"
    return text + (" *" if iv.significant else "")


def pairs_markdown(
    pairs: dict[tuple[str, str], dict[str, Interval]], metric: str, samples: int
) -> str:
    """One row per pair: the difference (second minus first) per set and on the mean."""
    keys = list(next(iter(pairs.values())))
    lines = [
        f"{metric.upper()} difference (points, second minus first; negative = the second is "
        f"better) with its 95% paired bootstrap interval ({samples} replicates; * = significant "
        "at 95%, the interval excludes 0)",
        "",
        "| pair | " + " | ".join(keys) + " |",
        "| --- |" + " ---: |" * len(keys),
    ]
    for (a, b), row in pairs.items():
        lines.append(f"| `{b}` − `{a}` | " + " | ".join(interval_cell(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"
