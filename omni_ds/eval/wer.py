"""Word and character error rates per test set with jiwer, the mean over test sets, the reports.

A set's WER is corpus-level, as jiwer computes it over a list of utterances: all substitutions,
deletions and insertions of the set divided by its number of reference words (after a normaliser
of :mod:`omni_ds.eval.normalize`, by default ``normalize_english``). Its CER is the same over
characters, spaces included, exactly as ``jiwer.cer`` counts them. The average is the plain mean
of the per-set rates over the *test* sets, as the Omni-router paper reports it (each set weighs the
same, however long; its average covers the out-of-domain sets only): sets named ``dev`` or
``dev`` + a non-letter (``dev_clean``, ``dev-other``, ``dev93``) are left out unless the report's
``mean_sets`` names them; with only dev sets, the mean is over those.

    scores = {name: score_set(refs, hyps) for name, (refs, hyps) in sets.items()}
    report = EvalReport(model="runs/omni", sets=scores)
    write_report(report, out_dir)   # eval.json, eval.csv, eval.md
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
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
    cer: float = math.nan
    """(character substitutions + deletions + insertions) / ref_chars, as ``jiwer.cer``."""
    ref_chars: int = 0
    """Reference characters after normalisation, spaces between words included."""
    char_errors: int = 0


@dataclasses.dataclass(kw_only=True)
class UtteranceErrors:
    """Per-utterance error and reference counts of one set, in reading order (the bootstrap's
    unit of resampling)."""

    word_errors: list[int]
    ref_words: list[int]
    char_errors: list[int]
    ref_chars: list[int]


_DEV = re.compile(r"dev([^a-z].*)?", re.IGNORECASE)


def is_dev_set(name: str) -> bool:
    """``dev``, ``dev_clean``, ``dev-other``, ``dev93``: a development set, not a test set."""
    return _DEV.fullmatch(name) is not None


def default_mean_sets(names: Sequence[str]) -> list[str]:
    """The sets averaged by default: every set that is not a dev set (all, if only dev sets)."""
    tests = [n for n in names if not is_dev_set(n)]
    return tests or list(names)


@dataclasses.dataclass(kw_only=True)
class EvalReport:
    """One model's scores on every test set, in the order the sets were given."""

    model: str
    """What was evaluated (the model directory as given on the command line)."""
    sets: dict[str, SetScore]
    mean_sets: list[str] | None = None
    """Sets the mean is taken over; None = :func:`default_mean_sets` (the dev sets left out)."""
    utterances: dict[str, UtteranceErrors] = dataclasses.field(default_factory=dict, repr=False)
    """Per-utterance counts per set (filled by scoring; not written to the report files)."""

    @property
    def averaged(self) -> list[str]:
        return list(self.mean_sets) if self.mean_sets is not None else default_mean_sets(self.sets)

    @property
    def mean_wer(self) -> float:
        """Plain mean of the per-set WERs over :attr:`averaged` (the paper's "average")."""
        return sum(self.sets[n].wer for n in self.averaged) / len(self.averaged)

    @property
    def mean_cer(self) -> float:
        return sum(self.sets[n].cer for n in self.averaged) / len(self.averaged)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "mean_wer": self.mean_wer,
            "mean_cer": self.mean_cer,
            "mean_sets": self.averaged,
            "sets": {name: dataclasses.asdict(s) for name, s in self.sets.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        sets = {name: SetScore(**s) for name, s in data["sets"].items()}
        mean_sets = data.get("mean_sets")
        if mean_sets == default_mean_sets(list(sets)):
            mean_sets = None
        return cls(model=data["model"], sets=sets, mean_sets=mean_sets)


def _per_utterance(out) -> tuple[list[int], list[int]]:
    """Errors and reference units per utterance from a jiwer alignment."""
    errors, refs = [], []
    for chunks in out.alignments:
        e = r = 0
        for c in chunks:
            n_ref, n_hyp = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
            r += n_ref
            e += n_hyp if c.type == "insert" else n_ref if c.type != "equal" else 0
        errors.append(e)
        refs.append(r)
    return errors, refs


def score_utterances(
    refs: Sequence[str],
    hyps: Sequence[str],
    normalize: Callable[[str], str] = normalize_english,
) -> tuple[SetScore, UtteranceErrors]:
    """Corpus-level WER and CER of ``hyps`` against ``refs`` after ``normalize`` on both sides,
    and the per-utterance counts they sum."""
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
    chars = jiwer.process_characters(refs, hyps)
    ref_chars = chars.hits + chars.substitutions + chars.deletions
    word_errors, words = _per_utterance(out)
    char_errors, letters = _per_utterance(chars)
    score = SetScore(
        wer=out.wer,
        utterances=len(refs),
        ref_words=ref_words,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        cer=chars.cer,
        ref_chars=ref_chars,
        char_errors=sum(char_errors),
    )
    counts = UtteranceErrors(word_errors=word_errors, ref_words=words, char_errors=char_errors,
                             ref_chars=letters)  # fmt: skip
    return score, counts


def score_set(
    refs: Sequence[str],
    hyps: Sequence[str],
    normalize: Callable[[str], str] = normalize_english,
) -> SetScore:
    """Corpus-level WER and CER of ``hyps`` against ``refs`` after ``normalize`` on both sides."""
    return score_utterances(refs, hyps, normalize)[0]


def percent(wer: float) -> str:
    """A WER as the tables print it: a percentage with two decimals (``0.1148`` → ``11.48``)."""
    return f"{100 * wer:.2f}"


def markdown_table(report: EvalReport) -> str:
    """One row per test set plus the mean over the averaged sets, WER and CER in percent."""
    lines = [
        f"WER and CER (%) of `{report.model}`",
        "",
        "| test set | utterances | words | WER | CER |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in report.sets.items():
        lines.append(
            f"| {name} | {s.utterances} | {s.ref_words} | {percent(s.wer)} | {percent(s.cer)} |"
        )
    left_out = [n for n in report.sets if n not in report.averaged]
    label = "**mean**" + (f" (without {', '.join(left_out)})" if left_out else "")
    lines.append(
        f"| {label} | | | **{percent(report.mean_wer)}** | **{percent(report.mean_cer)}** |"
    )
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
    "cer",
    "ref_chars",
    "char_errors",
]


def write_csv(reports: Sequence[EvalReport], path: Path) -> None:
    """One row per (model, set), plus a ``mean`` row per model with only WER and CER filled in."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in reports:
            for name, s in r.sets.items():
                writer.writerow({"model": r.model, "set": name, **dataclasses.asdict(s)})
            writer.writerow({"model": r.model, "set": "mean", "wer": r.mean_wer, "cer": r.mean_cer})


def write_json(reports: Sequence[EvalReport], path: Path) -> None:
    path.write_text(json.dumps({"models": [r.to_dict() for r in reports]}, indent=2) + "\n")


def read_json(path: Path) -> list[EvalReport]:
    return [EvalReport.from_dict(m) for m in json.loads(Path(path).read_text())["models"]]
