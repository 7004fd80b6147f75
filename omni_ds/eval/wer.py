"""Word error rate per test set with jiwer, the plain mean over sets, and the report files.

A set's WER is corpus-level, as jiwer computes it over a list of utterances: all substitutions,
deletions and insertions of the set divided by its number of reference words (after
:func:`~omni_ds.eval.normalize.normalize_english`). The average over sets is the plain mean of
the per-set WERs, as the Omni-router paper reports it (each set weighs the same, however long).

    scores = {name: score_set(refs, hyps) for name, (refs, hyps) in sets.items()}
    report = EvalReport(model="runs/omni", sets=scores)
    write_report(report, out_dir)   # eval.json, eval.csv, eval.md
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jiwer

from omni_ds.eval.normalize import normalize_english


@dataclasses.dataclass(kw_only=True)
class SetScore:
    """WER and its error counts on one test set (words after normalisation)."""

    wer: float
    """(substitutions + deletions + insertions) / ref_words; 0.25 means 25 %."""
    utterances: int
    ref_words: int
    substitutions: int
    deletions: int
    insertions: int


@dataclasses.dataclass(kw_only=True)
class EvalReport:
    """One model's scores on every test set, in the order the sets were given."""

    model: str
    """What was evaluated (the model directory as given on the command line)."""
    sets: dict[str, SetScore]

    @property
    def mean_wer(self) -> float:
        """Plain mean of the per-set WERs (the paper's "average" column)."""
        return sum(s.wer for s in self.sets.values()) / len(self.sets)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "mean_wer": self.mean_wer,
            "sets": {name: dataclasses.asdict(s) for name, s in self.sets.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        sets = {name: SetScore(**s) for name, s in data["sets"].items()}
        return cls(model=data["model"], sets=sets)


def score_set(
    refs: Sequence[str],
    hyps: Sequence[str],
    normalize: Callable[[str], str] = normalize_english,
) -> SetScore:
    """Corpus-level WER of ``hyps`` against ``refs`` after ``normalize`` on both sides."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses; they must pair up")
    if not refs:
        raise ValueError("an empty test set has no WER; check the test set path")
    refs = [normalize(r) for r in refs]
    hyps = [normalize(h) for h in hyps]
    out = jiwer.process_words(refs, hyps)
    ref_words = out.hits + out.substitutions + out.deletions
    if ref_words == 0:
        raise ValueError("every reference is empty after normalisation; WER is undefined")
    return SetScore(
        wer=out.wer,
        utterances=len(refs),
        ref_words=ref_words,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
    )


def percent(wer: float) -> str:
    """A WER as the tables print it: a percentage with two decimals (``0.1148`` → ``11.48``)."""
    return f"{100 * wer:.2f}"


def markdown_table(report: EvalReport) -> str:
    """One row per test set plus the mean, WER in percent."""
    lines = [
        f"WER (%) of `{report.model}`",
        "",
        "| test set | utterances | words | WER |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, s in report.sets.items():
        lines.append(f"| {name} | {s.utterances} | {s.ref_words} | {percent(s.wer)} |")
    lines.append(f"| **mean** | | | **{percent(report.mean_wer)}** |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "model",
    "set",
    "wer",
    "utterances",
    "ref_words",
    "substitutions",
    "deletions",
    "insertions",
]


def write_csv(reports: Sequence[EvalReport], path: Path) -> None:
    """One row per (model, set), plus a ``mean`` row per model with only the WER filled in."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in reports:
            for name, s in r.sets.items():
                writer.writerow({"model": r.model, "set": name, **dataclasses.asdict(s)})
            writer.writerow({"model": r.model, "set": "mean", "wer": r.mean_wer})


def write_json(reports: Sequence[EvalReport], path: Path) -> None:
    path.write_text(json.dumps({"models": [r.to_dict() for r in reports]}, indent=2) + "\n")


def read_json(path: Path) -> list[EvalReport]:
    return [EvalReport.from_dict(m) for m in json.loads(Path(path).read_text())["models"]]
