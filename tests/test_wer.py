"""Text normaliser, WER per set (checked against jiwer), report files and the comparison table."""

from __future__ import annotations

import csv
import json

import jiwer
import pytest

from omni_ds.eval.compare import comparison_markdown, reductions, relative_reduction
from omni_ds.eval.normalize import normalize_english
from omni_ds.eval.wer import (
    EvalReport,
    SetScore,
    markdown_table,
    read_json,
    score_set,
    write_csv,
    write_json,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", "hello world"),
        ("Don\u2019t stop 'cause it's", "don't stop cause it's"),
        ("rock 'n' roll", "rock n roll"),
        ("well-known \u2014 SPEECH", "well known speech"),
        ("[noise] yes <unk> no [laughter]", "yes no"),
        ("1,000.5 metres, 3.", "1000.5 metres 3"),
        ("  tabs\tand\nnewlines  ", "tabs and newlines"),
        ("\uff21\uff22\uff23 \u201cquoted\u201d", "abc quoted"),
        ("50% off $3 & more", "50 off 3 more"),
        ("Stra\u00dfe \u00c9T\u00c9", "strasse \u00e9t\u00e9"),
        ("", ""),
    ],
)
def test_normalizer(text, expected):
    assert normalize_english(text) == expected


def test_normalizer_is_idempotent():
    text = "It's 10:30 -- the U.S. [noise] team's \u201cbest\u201d day, isn't it?"
    once = normalize_english(text)
    assert normalize_english(once) == once


REFS = ["the cat sat on the mat", "Hello, world!", "a b c d e", "one two three"]
HYPS = ["the cat sat on a mat", "hello world", "a c d e f g", ""]


def test_score_set_equals_jiwer():
    score = score_set(REFS, HYPS)
    refs = [normalize_english(r) for r in REFS]
    hyps = [normalize_english(h) for h in HYPS]
    assert score.wer == jiwer.wer(refs, hyps)
    # hand count: 1 sub; 0; 1 del + 2 ins; 3 del -> 7 errors over 6 + 2 + 5 + 3 = 16 words
    assert (score.substitutions, score.deletions, score.insertions) == (1, 4, 2)
    assert score.ref_words == 16 and score.utterances == 4
    assert score.wer == pytest.approx(7 / 16)


def test_score_set_rejects_mismatch_and_empty():
    with pytest.raises(ValueError, match="pair up"):
        score_set(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        score_set([], [])


def _report(model, wers):
    sets = {
        name: SetScore(
            wer=w, utterances=1, ref_words=100, substitutions=0, deletions=0, insertions=0
        )
        for name, w in wers.items()
    }
    return EvalReport(model=model, sets=sets)


def test_report_files_round_trip(tmp_path):
    a = EvalReport(model="m", sets={"dev": score_set(REFS, HYPS), "test": score_set(REFS, REFS)})
    write_json([a], tmp_path / "eval.json")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["models"][0]["sets"]["dev"]["wer"] == jiwer.wer(
        [normalize_english(r) for r in REFS], [normalize_english(h) for h in HYPS]
    )
    assert data["models"][0]["sets"]["test"]["wer"] == 0.0
    assert data["models"][0]["mean_wer"] == 0.0  # the mean over test sets leaves dev out
    assert EvalReport(model="m", sets=a.sets, mean_sets=["dev", "test"]).mean_wer == pytest.approx(
        (7 / 16 + 0) / 2
    )
    assert read_json(tmp_path / "eval.json")[0] == a
    write_csv([a], tmp_path / "eval.csv")
    rows = list(csv.DictReader(open(tmp_path / "eval.csv")))
    assert [r["set"] for r in rows] == ["dev", "test", "mean"]
    assert float(rows[0]["wer"]) == a.sets["dev"].wer
    assert float(rows[2]["wer"]) == pytest.approx(a.mean_wer)
    table = markdown_table(a)
    assert "| dev | 4 | 16 | 43.75 |" in table
    assert "| **mean** (without dev) | | | **0.00** | **0.00** |" in table


def test_comparison_table_hand_made():
    dense = _report("dense", {"ami": 0.20, "libri": 0.05})
    switch = _report("switch", {"ami": 0.18, "libri": 0.04})
    omni = _report("omni", {"ami": 0.15, "libri": 0.04})
    red = reductions([dense, switch, omni])
    assert red["dense"]["ami"] == pytest.approx(0.25)
    assert red["dense"]["libri"] == pytest.approx(0.20)
    # average: reduction of the mean WER (0.125 -> 0.095), not the mean of per-set reductions
    assert red["dense"]["average"] == pytest.approx(0.24)
    assert red["switch"]["ami"] == pytest.approx(1 / 6)
    assert red["switch"]["libri"] == pytest.approx(0.0)
    assert red["switch"]["average"] == pytest.approx(0.015 / 0.11)
    table = comparison_markdown([dense, switch, omni])
    lines = table.splitlines()
    assert "| model | ami | libri | average |" in lines
    assert "| `dense` | 20.00 | 5.00 | 12.50 |" in lines
    assert "| `switch` | 18.00 | 4.00 | 11.00 |" in lines
    assert "| `omni` | 15.00 | 4.00 | 9.50 |" in lines
    assert "| `omni` vs `dense` | 25.00 | 20.00 | 24.00 |" in lines
    assert "| `omni` vs `switch` | 16.67 | 0.00 | 13.64 |" in lines
    # a worse candidate gives negative reductions
    assert (
        "| `dense` vs `omni` | -33.33 | -25.00 | -31.58 |"
        in comparison_markdown([omni, dense]).splitlines()
    )


def test_comparison_needs_same_sets():
    with pytest.raises(ValueError, match="same --test-set"):
        reductions([_report("a", {"x": 0.1}), _report("b", {"y": 0.1})])
    with pytest.raises(ValueError, match="baseline WER is 0"):
        relative_reduction(0.0, 0.1)
