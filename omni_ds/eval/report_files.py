"""What ``omni-ds eval`` writes: per-model scores, seed groups and pairwise intervals.

``eval.json``::

    {"normalizer": "omni",
     "models": [{"model", "mean_wer", "mean_cer", "mean_sets", "sets": {set: SetScore}}],
     "groups": [{"name", "runs": [model, ...], "wer": {set|"mean": [mean, std]}, "cer": ...}],
     "pairs": [{"a", "b", "metric", "samples", "seed",
                "intervals": {set|"mean": {"diff", "low", "high", "p_better", "significant"}}}]}

``diff`` is b − a (negative: b is better). ``eval.csv`` has one row per (model, set) plus a mean
row per model; ``eval.md`` holds every table printed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from omni_ds.eval.bootstrap import MEAN, Replicates
from omni_ds.eval.compare import comparison_markdown
from omni_ds.eval.seeds import group_reports, groups_markdown, pairs_markdown
from omni_ds.eval.wer import EvalReport, markdown_table, write_csv

METRICS = ("wer", "cer")


def write_all(
    reports: Sequence[EvalReport],
    recipes: Sequence[str | None],
    out: Path,
    samples: int = 1000,
    seed: int = 0,
    normalizer: str = "omni",
    seeds: Sequence[str | None] | None = None,
) -> str:
    """Writes the three report files into ``out``; returns eval.md's text. ``recipes`` and
    ``seeds`` (the models' metadata) decide the seed groups."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_reports(reports, recipes, seeds)
    tables = [markdown_table(r) for r in reports]
    if any(len(g.runs) > 1 for g in groups):
        tables += [groups_markdown(groups, m) for m in METRICS]
    elif len(reports) > 1:
        tables.append(comparison_markdown(reports))
    pairs_json = []
    if len(groups) > 1 and samples > 0:
        names = list(reports[0].sets)
        keys = [*names, MEAN]
        members = {g.name: g.runs for g in groups}
        for metric in METRICS:
            reps = Replicates.draw(members, metric, names, reports[0].averaged, samples, seed)
            pairs = reps.pairs(keys)
            tables.append(pairs_markdown(pairs, metric, samples))
            for (a, b), row in pairs.items():
                cells = {k: {**dataclasses.asdict(iv), "significant": iv.significant}
                         for k, iv in row.items()}  # fmt: skip
                pairs_json.append({"a": a, "b": b, "metric": metric, "samples": samples,
                                   "seed": seed, "intervals": cells})  # fmt: skip
    data = {
        "normalizer": normalizer,
        "models": [r.to_dict() for r in reports],
        "groups": [
            {
                "name": g.name,
                "runs": [r.model for r in g.runs],
                **{
                    m: {k: list(g.mean_std(m, k)) for k in [*g.runs[0].sets, MEAN]} for m in METRICS
                },
            }
            for g in groups
        ],  # fmt: skip
        "pairs": pairs_json,
    }
    (out / "eval.json").write_text(json.dumps(data, indent=2) + "\n")
    write_csv(reports, out / "eval.csv")
    text = "\n".join(tables)
    (out / "eval.md").write_text(text)
    return text
