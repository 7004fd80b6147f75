"""CER, the normaliser choice, the mean over test sets, seed groups and the paired bootstrap."""

from __future__ import annotations

import json

import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from omni_ds.eval.bootstrap import MEAN, Replicates
from omni_ds.eval.normalize import get_normalizer, normalize_english
from omni_ds.eval.report_files import write_all
from omni_ds.eval.seeds import group_name, group_reports
from omni_ds.eval.wer import EvalReport, SetScore, UtteranceErrors, score_utterances

REFS = [
    "the cat sat on the mat",
    "Hello, world!",
    "a b c d e",
    "one two three",
    "Mr. Smith's colour",
]
HYPS = ["the cat sad on a mat", "hello word", "a c d e f g", "", "mister smiths color"]


@pytest.mark.parametrize("name", ["omni", "whisper", "none"])
def test_cer_and_wer_equal_jiwer_after_each_normaliser(name):
    norm = get_normalizer(name)
    score, counts = score_utterances(REFS, HYPS, norm)
    refs, hyps = [norm(r) for r in REFS], [norm(h) for h in HYPS]
    assert score.cer == jiwer.cer(refs, hyps)
    assert score.wer == jiwer.wer(refs, hyps)
    # the per-utterance counts sum to the set's, and each is jiwer's for that utterance alone
    assert sum(counts.char_errors) == score.char_errors and sum(counts.ref_chars) == score.ref_chars
    assert sum(counts.word_errors) / sum(counts.ref_words) == pytest.approx(score.wer)
    for i in (0, 2, 4):
        assert counts.char_errors[i] / counts.ref_chars[i] == pytest.approx(
            jiwer.cer(refs[i], hyps[i])
        )


def test_whisper_normaliser_is_the_packages():
    text = "Mr. Smith's colour, uh, cost $2 -- didn't it?"
    assert get_normalizer("whisper")(text) == EnglishTextNormalizer()(text)
    assert get_normalizer("whisper")(text) != normalize_english(text)
    assert get_normalizer("none")(text) == text
    with pytest.raises(ValueError, match="omni, whisper, none"):
        get_normalizer("basic")


def _score(wer: float) -> SetScore:
    return SetScore(wer=wer, cer=wer / 2, utterances=10, ref_words=100, substitutions=0,
                    deletions=0, insertions=0)  # fmt: skip


def test_the_mean_leaves_dev_sets_out_unless_asked():
    sets = {
        "dev": _score(0.1),
        "dev-other": _score(0.2),
        "noisy": _score(0.3),
        "devices": _score(0.5),
    }
    r = EvalReport(model="m", sets=sets)
    assert r.averaged == ["noisy", "devices"] and r.mean_wer == pytest.approx(0.4)
    assert r.mean_cer == pytest.approx(0.2)
    every = EvalReport(model="m", sets=sets, mean_sets=list(sets))
    assert every.mean_wer == pytest.approx(0.275)
    only_dev = EvalReport(model="m", sets={"dev": _score(0.1)})
    assert only_dev.mean_wer == pytest.approx(0.1)
    back = EvalReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.to_dict()["mean_sets"] == ["noisy", "devices"]


def test_seed_groups_give_mean_and_std():
    wers = [0.30, 0.34, 0.41]
    runs = [
        EvalReport(model=f"L4-omni-s{i}", sets={"noisy": _score(w)}) for i, w in enumerate(wers)
    ]
    other = EvalReport(model="dense", sets={"noisy": _score(0.5)})
    groups = group_reports([*runs, other], ["r1", "r1", "r1", None])
    assert [g.name for g in groups] == ["L4-omni", "dense"]
    mean, std = groups[0].mean_std("wer", "noisy")
    assert mean == pytest.approx(np.mean(wers)) and std == pytest.approx(np.std(wers, ddof=1))
    assert groups[0].mean_std("cer") == pytest.approx((np.mean(wers) / 2, np.std(wers, ddof=1) / 2))
    assert groups[1].mean_std("wer") == (0.5, 0.0)
    assert group_name(["run_seed1", "run_seed2"]) == "run" and group_name(["a", "b"]) == "a+1"


def _simulated(rng, rate: float, refs: np.ndarray, seeds: int = 1, name: str = "m") -> list:
    """Runs whose per-utterance errors are binomial at ``rate`` (plus a per-seed offset)."""
    out = []
    for s in range(seeds):
        errors = rng.binomial(refs, min(1.0, rate + 0.01 * s))
        r = EvalReport(model=f"{name}-s{s}", sets={"t": _score(errors.sum() / refs.sum())})
        r.utterances["t"] = UtteranceErrors(word_errors=errors.tolist(), ref_words=refs.tolist(),
                                            char_errors=errors.tolist(), ref_chars=refs.tolist())  # fmt: skip
        out.append(r)
    return out


def test_bootstrap_interval_contains_the_true_difference_and_is_reproducible():
    rng = np.random.default_rng(1)
    refs = rng.integers(3, 25, size=300)
    groups = {"a": _simulated(rng, 0.20, refs), "b": _simulated(rng, 0.25, refs)}
    reps = Replicates.draw(groups, "wer", ["t"], ["t"], n=1000, seed=7)
    iv = reps.interval("a", "b", MEAN)
    assert iv.low < 0.05 < iv.high and iv.significant and iv.p_better < 0.01
    assert iv.diff == pytest.approx(reps.point["b"]["t"] - reps.point["a"]["t"])
    again = Replicates.draw(groups, "wer", ["t"], ["t"], n=1000, seed=7).interval("a", "b")
    assert again == iv
    assert Replicates.draw(groups, "wer", ["t"], ["t"], n=1000, seed=8).interval("a", "b") != iv
    # The same system twice: a zero difference, never significant.
    same = Replicates.draw({"a": groups["a"], "a2": groups["a"]}, "wer", ["t"], ["t"], n=200)
    assert same.interval("a", "a2").diff == 0 and not same.interval("a", "a2").significant


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    refs = rng.integers(3, 25, size=150)
    hits = 0
    for trial in range(200):
        groups = {"a": _simulated(rng, 0.20, refs), "b": _simulated(rng, 0.22, refs)}
        iv = Replicates.draw(groups, "wer", ["t"], ["t"], n=400, seed=trial).interval("a", "b")
        hits += iv.low <= 0.02 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_report_files_group_seeds_and_mark_significant_pairs(tmp_path):
    rng = np.random.default_rng(3)
    refs = rng.integers(3, 25, size=200)
    runs = [*_simulated(rng, 0.30, refs, 3, "dense"), *_simulated(rng, 0.20, refs, 3, "omni"),
            *_simulated(rng, 0.205, refs, 3, "switch")]  # fmt: skip
    recipes = ["d"] * 3 + ["o"] * 3 + ["s"] * 3
    text = write_all(runs, recipes, tmp_path, samples=500, seed=0)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [g["name"] for g in data["groups"]] == ["dense", "omni", "switch"]
    pairs = {(p["a"], p["b"], p["metric"]): p["intervals"]["mean"] for p in data["pairs"]}
    assert len(pairs) == 6
    assert (
        pairs["dense", "omni", "wer"]["significant"] and pairs["dense", "omni", "wer"]["diff"] < 0
    )
    assert not pairs["omni", "switch", "wer"]["significant"]
    assert "| `omni` − `dense` |" in text and " *" in text and "± " in text
    assert (tmp_path / "eval.md").read_text() == text


def test_hypotheses_files_read_back_as_written(tmp_path):
    from omni_ds.eval.inference import Transcripts

    t = Transcripts(keys=["a", "b"], refs=["Hello,  world!", "x\ty"], hyps=["hello world", ""])
    t.write_tsv(tmp_path / "h.tsv")
    back = Transcripts.read_tsv(tmp_path / "h.tsv")
    assert back.keys == t.keys and back.hyps == t.hyps
    assert back.refs == ["Hello,  world!", "x y"]  # only a tab inside a text becomes a space
