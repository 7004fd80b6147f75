"""The paper-style comparison of several models on the same test sets.

Rows are models (WER in percent per set and the plain mean over sets); below them, one row per
baseline with the relative WER reduction of the *candidate* (by default the last model given,
e.g. ``dense switch omni`` compares omni against dense and against Switch):

    reduction(set)     = (WER_baseline(set) - WER_candidate(set)) / WER_baseline(set)
    reduction(average) = (mean_baseline - mean_candidate) / mean_baseline

so the average column is the reduction of the mean WER, which is how the paper's "11.2 % lower
average WER than dense" is computed, not the mean of per-set reductions. Positive means the
candidate is better.
"""

from __future__ import annotations

from collections.abc import Sequence

from omni_ds.eval.wer import EvalReport, percent


def relative_reduction(baseline: float, candidate: float) -> float:
    """(baseline - candidate) / baseline; 0.112 means the candidate's WER is 11.2 % lower."""
    if baseline == 0:
        raise ValueError("the baseline WER is 0, so a relative reduction is undefined")
    return (baseline - candidate) / baseline


def check_same_sets(reports: Sequence[EvalReport]) -> list[str]:
    """The common test-set names; every model must have been scored on exactly the same sets."""
    names = list(reports[0].sets)
    for r in reports[1:]:
        if set(r.sets) != set(names):
            raise ValueError(
                f"{r.model} was scored on {sorted(r.sets)} but {reports[0].model} on "
                f"{sorted(names)}; evaluate all models on the same --test-set list"
            )
    return names


def reductions(reports: Sequence[EvalReport], candidate: int = -1) -> dict[str, dict[str, float]]:
    """``{baseline model: {set: reduction, ..., "average": reduction}}`` for the candidate."""
    names = check_same_sets(reports)
    cand = reports[candidate]
    out = {}
    for base in reports:
        if base is cand:
            continue
        row = {n: relative_reduction(base.sets[n].wer, cand.sets[n].wer) for n in names}
        row["average"] = relative_reduction(base.mean_wer, cand.mean_wer)
        out[base.model] = row
    return out


def comparison_markdown(reports: Sequence[EvalReport], candidate: int = -1) -> str:
    """The comparison as a Markdown table (WER and reductions in percent, two decimals)."""
    names = check_same_sets(reports)
    cand = reports[candidate].model
    header = ["model", *names, "average"]
    lines = [
        f"WER (%) per test set; last rows: relative WER reduction (%) of `{cand}` "
        "against each other model (positive = lower WER)",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for r in reports:
        cells = [f"`{r.model}`", *(percent(r.sets[n].wer) for n in names), percent(r.mean_wer)]
        lines.append("| " + " | ".join(cells) + " |")
    for base, row in reductions(reports, candidate).items():
        cells = [f"`{cand}` vs `{base}`", *(f"{100 * row[k]:.2f}" for k in [*names, "average"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
