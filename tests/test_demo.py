"""`omni-ds demo`: a shortened demo end to end (real corpus, torchrun, DeepSpeed, eval, analysis),
a second run that reuses every stage, and the report's verdicts following the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omni_ds.demo.report import (
    EvalResults,
    training_findings,
    verdicts,
    wer_findings,
    write_report,
)
from omni_ds.demo.stages import ROUTERS, TEST_SETS, Stage, StageFailed, _finished, run_stage
from omni_ds.eval.report_files import write_all
from omni_ds.eval.wer import EvalReport, SetScore, UtteranceErrors

REPO = Path(__file__).resolve().parents[1]
PLOTS = ("usage", "entropy", "agreement", "rasters")


def demo(out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "omni_ds.cli", "demo", "--out", str(out),
            "--steps", "6", "--train-utterances", "96", "--seeds", "1"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.distributed
def test_short_demo_runs_end_to_end_then_reuses_every_stage(tmp_path):
    out = tmp_path / "demo"
    first = demo(out)
    reports = json.loads((out / "eval" / "eval.json").read_text())["models"]
    assert [Path(r["model"]).name for r in reports] == list(ROUTERS)
    for r in reports:
        assert list(r["sets"]) == list(TEST_SETS)
        assert all(s["utterances"] == 20 and 0 <= s["wer"] for s in r["sets"].values())
    for router in ROUTERS:
        resolved = (out / router / "config.yaml").read_text()
        assert f"router: {router}" in resolved
        assert f"ep_size: {1 if router == 'dense' else 2}" in resolved
        assert (out / router / "checkpoints" / "step_6").is_dir()
        assert (out / "models" / router / "model.safetensors").is_file()
    report = (out / "REPORT.md").read_text()
    for router in ("switch", "omni"):
        analysis = json.loads((out / "analysis" / router / "analysis.json").read_text())
        assert analysis["router"] == router and analysis["num_moe_layers"] == 4
        for plot in PLOTS:
            assert (out / "analysis" / router / f"{plot}.png").stat().st_size > 1000
            assert f"(analysis/{router}/{plot}.png)" in report
    assert "| `omni` vs `dense` |" in first.stdout and "| `omni` vs `switch` |" in report
    assert "**One seed per router:** the intervals below resample test utterances only" in report
    assert first.stdout.count("[demo ") == 22 and "reused" not in first.stdout

    second = demo(out)
    assert second.stdout.count("reused") == 11  # every stage, none ran
    assert "$ " not in second.stdout
    assert "| `omni` vs `dense` |" in second.stdout


def runs(model: str, rates: dict[str, float], seeds: int, rng) -> list[EvalReport]:
    """``seeds`` runs whose per-utterance word errors are binomial at each set's rate."""
    out = []
    refs = np.full(200, 10)
    for s in range(seeds):
        r = EvalReport(model=model if s == 0 else f"{model}-s{s}", sets={})
        for name, rate in rates.items():
            e = rng.binomial(refs, rate)
            r.sets[name] = SetScore(wer=e.sum() / refs.sum(), cer=e.sum() / refs.sum() / 2,
                                    utterances=200, ref_words=2000, substitutions=int(e.sum()),
                                    deletions=0, insertions=0)  # fmt: skip
            r.utterances[name] = UtteranceErrors(word_errors=e.tolist(), ref_words=refs.tolist(),
                                                 char_errors=(e // 2).tolist(),
                                                 ref_chars=(refs * 5).tolist())  # fmt: skip
        out.append(r)
    return out


def test_report_verdicts_follow_the_intervals_including_where_omni_loses(tmp_path):
    rng = np.random.default_rng(0)
    sets = ("dev", "test_fast", "test_noisy")
    models = [*runs("dense", dict(zip(sets, (0.10, 0.30, 0.20))), 2, rng),
              *runs("switch", dict(zip(sets, (0.12, 0.31, 0.50))), 2, rng),
              *runs("omni", dict(zip(sets, (0.105, 0.40, 0.25))), 2, rng)]  # fmt: skip
    write_all(models, ["d", "d", "s", "s", "o", "o"], tmp_path, samples=400)
    res = EvalResults(json.loads((tmp_path / "eval.json").read_text()))
    assert verdicts(res.diff("switch", "omni")) == {
        "better": ["test_noisy"], "worse": ["test_fast"], "tie": ["dev"]}  # fmt: skip
    v = verdicts(res.diff("dense", "omni"))
    assert v["worse"] == ["test_fast", "test_noisy"] and v["tie"] == ["dev"]
    assert res.diff("omni", "dense")["mean"].diff == pytest.approx(
        -res.diff("dense", "omni")["mean"].diff
    )
    text = "\n".join(wer_findings(res))
    assert "Mean WER over the 2 shifted test sets" in text  # dev left out of the mean
    assert "The paper's ordering (omni best) is not established here" in text
    assert "better on none; worse on `test_fast`, `test_noisy`" in text
    assert "Clean-dev WER (mean of 2 seeds): dense 10." in text
    ctc = {"dense": {"dense": {"ctc": 0.9}}, "switch": {"switch": {"ctc": 0.5}},
           "omni": {"omni": {"ctc": 0.6}}}  # fmt: skip
    line = training_findings(ctc)[0]
    assert "lowest first: switch 0.500, omni 0.600, dense 0.900" in line and "not so here" in line
    assert len(training_findings(ctc)) == 1  # no run stalled
    ctc["switch"]["switch-s1"] = {"ctc": 2.1}  # a seed that did not learn
    stalled = training_findings(ctc)[1]
    assert "1 of 4 runs did not learn" in stalled and "`switch-s1` 2.100 (2.8x)" in stalled

    # The whole report of a two-seed demo (no routing analysis here): tables, CTC, logged dev WER.
    out = tmp_path / "demo"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "eval.json").write_text((tmp_path / "eval.json").read_text())
    for i, name in enumerate(["dense", "dense-s1", "switch", "switch-s1", "omni", "omni-s1"]):
        rows = [
            {"kind": "train", "step": s, "ctc": 1.0 + i - s / 100, "loss": 9.0} for s in (10, 20)
        ]
        rows.append({"kind": "dev/dev", "step": 20, "wer": 0.5, "utterances": 49})
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, table = write_report(out, "settings", [], seeds=2)
    text = path.read_text()
    assert "| `omni` | 2 | 10." in table and "− `dense` |" in table  # mean ± std, intervals
    assert "| dense-s1 | 1.850 | 50.0% (49) |" in text  # CTC, not the logged loss
    assert "first `train.dev_max_batches` dev batches" in text


def test_stage_records_decide_reuse_resume_and_clean(tmp_path):
    """A finished stage is reused only with the same params and outputs; a failed (interrupted)
    one keeps its outputs for the rerun to resume from; other params start clean."""
    out, work = tmp_path / "demo", tmp_path / "work"
    work.mkdir()
    (work / "stale").write_text("another setting's output")

    def stage(code: str, params: dict) -> Stage:
        argv = [sys.executable, "-c", code]
        return Stage(name="s", title="s", argv=argv, outputs=[work / "done"], params=params,
                     clean=work)  # fmt: skip

    partial = f"import os; os.makedirs({str(work)!r}); open({str(work / 'partial')!r}, 'w')"
    failing = stage(partial + "; raise SystemExit(3)", {"steps": 5})
    with pytest.raises(StageFailed, match="exit 3"):
        run_stage(failing, out)  # no record yet: starts clean
    assert not (work / "stale").exists() and _finished(failing, out) is None
    resumed = stage(f"open({str(work / 'done')!r}, 'w')", {"steps": 5})
    run_stage(resumed, out)  # same params after a failure: outputs kept
    assert (work / "partial").exists() and _finished(resumed, out)["status"] == "done"
    assert _finished(stage("", {"steps": 6}), out) is None
    (work / "done").unlink()
    assert _finished(resumed, out) is None
    done = f"import os; os.makedirs({str(work)!r}); open({str(work / 'done')!r}, 'w')"
    run_stage(stage(done, {"steps": 6}), out)
    assert not (work / "partial").exists()  # other params: cleaned first
