"""``runs/demo/REPORT.md``: the demo's measured numbers and what they do and do not show.

Every sentence about the results is chosen from the numbers (WER and CER per set, their paired
bootstrap intervals from ``omni-ds eval``, training CTC, routing statistics); nothing is written
in advance. A difference counts as a win or a loss only when its 95% interval excludes 0; with
several seeds per router the interval also covers the seed-to-seed variation.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from omni_ds.eval.bootstrap import MEAN, Interval
from omni_ds.eval.compare import comparison_markdown
from omni_ds.eval.seeds import Group, groups_markdown, interval_cell, pairs_markdown
from omni_ds.eval.wer import EvalReport

ROUTERS = ("dense", "switch", "omni")
CTC_LAST = 5
STALL_FACTOR = 2.0
"""A run whose final training CTC exceeds this multiple of the median over all runs is named as
one that did not learn (a stalled seed), so its recipe's mean is not read as the recipe's."""
"""Training CTC is compared as the mean of the last this many logged steps."""


class EvalResults:
    """``eval/eval.json`` of the demo: the models, their seed groups and the pairwise intervals."""

    def __init__(self, data: dict):
        self.reports = {m["model"]: EvalReport.from_dict(m) for m in data["models"]}
        self.groups = {g["name"]: Group(g["name"], [self.reports[r] for r in g["runs"]])
                       for g in data["groups"]}  # fmt: skip
        self.pairs: dict[tuple[str, str, str], dict[str, Interval]] = {}
        for p in data.get("pairs", []):
            cells = {k: Interval(v["diff"], v["low"], v["high"], v["p_better"])
                     for k, v in p["intervals"].items()}  # fmt: skip
            self.pairs[p["a"], p["b"], p["metric"]] = cells

    def diff(self, a: str, b: str, metric: str = "wer") -> dict[str, Interval]:
        """Intervals of b − a per set and on MEAN (negated when eval listed the pair as b, a)."""
        if (a, b, metric) in self.pairs:
            return self.pairs[a, b, metric]
        back = self.pairs[b, a, metric]
        return {k: Interval(-i.diff, -i.high, -i.low, 1 - i.p_better) for k, i in back.items()}


def verdicts(intervals: dict[str, Interval]) -> dict[str, list[str]]:
    """Sets where b (of an ``EvalResults.diff(a, b)``) is significantly better, worse, or neither."""
    out: dict[str, list[str]] = {"better": [], "worse": [], "tie": []}
    for name, iv in intervals.items():
        if name != MEAN:
            out["better" if iv.significant and iv.diff < 0 else
                "worse" if iv.significant else "tie"].append(name)  # fmt: skip
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rel(base: float, cand: float) -> str:
    if base == 0:
        return "n/a (baseline WER 0)"
    return f"{100 * (base - cand) / base:+.1f}%"


def _listing(names: Sequence[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "none"


def _said(iv: Interval) -> str:
    verdict = "significant" if iv.significant else "not significant"
    return f"{100 * iv.diff:+.1f} points, 95% CI [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}], {verdict}"


def wer_findings(res: EvalResults) -> list[str]:
    g = res.groups
    runs = len(g["omni"].runs)
    dev = {r: g[r].mean_std("wer", "dev")[0] for r in ROUTERS}
    learned = max(dev.values()) < 0.9
    seeds = f"mean of {runs} seeds" if runs > 1 else "one seed"
    lines = [
        ("- **The models learn.** " if learned else
         "- **The models have NOT learned yet** (too few steps); the comparisons below are noise. ")
        + f"Clean-dev WER ({seeds}): " + ", ".join(f"{r} {_pct(w)}" for r, w in dev.items())
        + " (an untrained model scores ~100%)."
    ]  # fmt: skip
    if runs == 1:
        lines.append(
            "- **One seed per router:** the intervals below resample test utterances only, not "
            "training seeds, and seed-to-seed differences can be larger than the gaps between "
            "routers (docs/research.md). `omni-ds demo --seeds 2` (about twice the training "
            "time) groups seeds into mean ± std and puts them in the intervals."
        )
    mean = {r: g[r].mean_std("wer")[0] for r in ROUTERS}
    ranked = sorted(ROUTERS, key=mean.__getitem__)
    averaged = g["omni"].runs[0].averaged
    lines.append(
        f"- **Mean WER over the {len(averaged)} shifted test sets** (dev left out, as the paper "
        "averages out-of-domain sets only), best first: "
        + ", ".join(f"{r} {_pct(mean[r])}" for r in ranked)
        + f". Omni's relative reduction: {_rel(mean['dense'], mean['omni'])} vs dense, "
        f"{_rel(mean['switch'], mean['omni'])} vs Switch (positive = omni better; the paper, on "
        "real speech at scale: 11.2% and 8.2%)."
    )
    if not res.pairs:
        return lines
    for base in ("dense", "switch"):
        wer, cer = res.diff(base, "omni", "wer"), res.diff(base, "omni", "cer")
        v = verdicts(wer)
        lines.append(
            f"- **Omni − {base}** on the mean WER: {_said(wer[MEAN])}; on the mean CER: "
            f"{_said(cer[MEAN])}. Per set (95% paired bootstrap, seeds resampled): omni "
            f"better on {_listing(v['better'])}; worse on {_listing(v['worse'])}; not "
            f"significantly different on {_listing(v['tie'])}."
        )
    sd = res.diff("dense", "switch", "wer")[MEAN]
    lines.append(f"- **Switch − dense** on the mean WER: {_said(sd)}.")
    shifted = [n for n in averaged]
    worst = {r: max(shifted, key=lambda n: g[r].mean_std("wer", n)[0]) for r in ROUTERS}
    lines.append(
        "- **Hardest shift per model:** "
        + ", ".join(f"{r}: `{n}` ({_pct(g[r].mean_std('wer', n)[0])})" for r, n in worst.items())
        + "."
    )
    if not learned:
        return lines
    vs = {b: res.diff(b, "omni", "wer")[MEAN] for b in ("dense", "switch")}
    if all(iv.significant and iv.diff < 0 for iv in vs.values()):
        lines.append("- Omni has a significantly lower mean WER than both baselines here. A "
                     "~0.6M-parameter model on a synthetic corpus: consistent with the paper, "
                     "not a reproduction of it.")  # fmt: skip
    else:
        lines.append(
            "- **The paper's ordering (omni best) is not established here**: "
            + "; ".join(f"vs {b} {interval_cell(iv)} points" for b, iv in vs.items())
            + " (* = significant). This demo checks the machinery end to end; it is not a "
            "reproduction of the paper's result (see docs/research.md for the seeded study)."
        )
    return lines


def routing_findings(analyses: dict[str, dict]) -> list[str]:
    if set(analyses) != {"switch", "omni"}:
        return [
            "- Routing analysis missing for "
            + ", ".join(sorted({"switch", "omni"} - set(analyses)))
        ]
    sw, om = analyses["switch"], analyses["omni"]
    nmi = {r: a["mean_offdiagonal_nmi"] for r, a in analyses.items()}
    lines = [
        f"- **Cross-layer agreement** (mean NMI between the expert choices of two layers, "
        f"`agreement.png`): Switch {nmi['switch']:.3f}, omni {nmi['omni']:.3f}. "
        + (
            "Omni's layers agree more, as the paper reports: one shared router makes the layers' "
            "choices cooperate."
            if nmi["omni"] > nmi["switch"]
            else "Omni's layers do NOT agree more than Switch's here, unlike in the paper."
        )  # fmt: skip
    ]
    for r, a in analyses.items():
        usage = a["usage_entropy_bits"]
        lines.append(
            f"- **{r} load balance** (`usage.png`, `entropy.png`): usage entropy per layer "
            + ", ".join(f"{u:.2f}" for u in usage)
            + f" bits of {a['max_entropy_bits']:.2f} possible"
            + (
                " (all layers close to uniform)."
                if min(usage) > 0.9 * a["max_entropy_bits"]
                else " (some layers favour few experts)."
            )  # fmt: skip
        )
    rr = {r: a["random_routing"] for r, a in analyses.items()}
    absolute = {r: x["absolute_increase"] for r, x in rr.items()}
    relative = {r: x["relative_increase"] or 0.0 for r, x in rr.items()}
    if absolute["omni"] > absolute["switch"] and relative["omni"] > relative["switch"]:
        verdict = "Omni degrades more, absolutely and relatively: its experts are more "
        verdict += "specialised, as in the paper."
    elif absolute["omni"] <= absolute["switch"] and relative["omni"] <= relative["switch"]:
        verdict = "Omni does NOT degrade more than Switch here (the paper finds it does)."
    else:
        verdict = "Mixed: omni loses more WER points but less relative to its own WER, or the "
        verdict += "reverse; no clear sign of more specialised experts."
    lines.append(
        "- **Random-routing ablation** (every expert choice replaced by a random expert, dev): "
        + "; ".join(
            f"{r} {_pct(analyses[r]['wer'])} → {_pct(x['wer'])} (+{100 * absolute[r]:.1f} points, "
            f"x{1 + relative[r]:.2f})"
            for r, x in rr.items()
        )
        + ". "
        + verdict
    )
    if om.get("rasters") and sw.get("rasters"):
        lines.append(
            "- `rasters.png` draws the expert index per frame (x: time, y: layer) for a few "
            "utterances: with omni, vertical stripes mean all layers pick the same expert "
            "for a frame."
        )
    return lines


def train_summary(run_dir: Path) -> dict:
    """Mean training CTC of the last CTC_LAST logged steps and the last logged dev WER.

    The logged ``loss`` of an MoE model is CTC + balance_loss_weight × balance (the load-balance
    term), so it is not comparable with a dense model's; ``ctc`` is."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train" and "ctc" in r]
    dev = [r for r in rows if r.get("kind") == "dev/dev"]
    ctc = [r["ctc"] for r in train[-CTC_LAST:]]
    return {"ctc": sum(ctc) / len(ctc) if ctc else math.nan,
            "dev_wer": dev[-1]["wer"] if dev else math.nan,
            "dev_utterances": dev[-1].get("utterances", 0) if dev else 0}  # fmt: skip


def training_findings(summaries: dict[str, dict[str, dict]]) -> list[str]:
    """``summaries``: router -> run name -> train_summary."""
    ctc = {r: [s["ctc"] for s in runs.values()] for r, runs in summaries.items()}
    mean = {r: sum(v) / len(v) for r, v in ctc.items()}
    if any(math.isnan(m) for m in mean.values()):
        return ["- Too few logged steps for a training-CTC comparison."]
    ranked = sorted(mean, key=mean.__getitem__)
    spread = {r: (min(v), max(v)) for r, v in ctc.items()}
    line = (f"- **Training CTC** (mean of the last {CTC_LAST} logged steps"
            + (", mean over seeds; range in brackets" if max(map(len, ctc.values())) > 1 else "")
            + "), lowest first: "
            + ", ".join(f"{r} {mean[r]:.3f}" + (f" [{spread[r][0]:.3f}–{spread[r][1]:.3f}]"
                        if len(ctc[r]) > 1 else "") for r in ranked)
            + ". The paper reports lower training loss for omni than for Switch: "
            + ("so here too." if mean["omni"] < mean["switch"] else "not so here.")
            + " (The logged `loss` of the MoE models adds the balance term; only `ctc` is "
            "compared.)")  # fmt: skip
    every = {name: s["ctc"] for runs in summaries.values() for name, s in runs.items()}
    median = statistics.median(every.values())
    stalled = {n: c for n, c in every.items() if c > STALL_FACTOR * median}
    if not stalled:
        return [line]
    return [line, (
        f"- **{len(stalled)} of {len(every)} runs did not learn** (final training CTC over "
        f"{STALL_FACTOR:g}x the median {median:.3f} of all runs): "
        + ", ".join(f"`{n}` {c:.3f} ({c / median:.1f}x)" for n, c in stalled.items())
        + ". Such a seed drags its recipe's mean and widens its intervals above; whether one "
        "recipe stalls more often than another takes more seeds (docs/research.md counts the "
        "study's stalls).")]  # fmt: skip


def write_report(
    out: Path, settings_line: str, times: Sequence, seeds: int = 1
) -> tuple[Path, str]:
    """Writes ``out/REPORT.md``; returns its path and the comparison table printed at the end."""
    from omni_ds.demo.stages import run_name

    res = EvalResults(json.loads((out / "eval" / "eval.json").read_text()))
    groups = [res.groups[r] for r in ROUTERS]
    if all(len(g.runs) == 1 for g in groups):
        table = comparison_markdown([g.runs[0] for g in groups])
    else:
        table = "\n".join(groups_markdown(groups, m) for m in ("wer", "cer"))
    pairs = {(a, b): res.pairs[a, b, "wer"] for (a, b, m) in res.pairs if m == "wer"}
    if pairs:
        table += "\n" + pairs_markdown(pairs, "wer", 1000)
    analyses = {}
    for r in ("switch", "omni"):
        path = out / "analysis" / r / "analysis.json"
        if path.exists():
            analyses[r] = json.loads(path.read_text())
    summaries = {r: {run_name(r, s): train_summary(out / run_name(r, s)) for s in range(seeds)}
                 for r in ROUTERS}  # fmt: skip
    total = sum(t.seconds for t in times if not t.reused)
    text = [
        "# omni-ds demo report",
        "",
        settings_line,
        "",
        "## WER and CER (%)",
        "",
        table,
        "Test sets (200 utterances each unless the corpus was resized): `dev` = the training "
        "speakers, clean; `test_unseen_speakers` = pitch and vocal-tract length outside the "
        "training ranges; `test_fast` = 1.4x tempo; `test_noisy` = white noise at 5 dB SNR; "
        "`test_telephone` = 300–3400 Hz band. The mean leaves dev out. Per-utterance "
        "hypotheses: `eval/hyps/`; every table with CER and intervals: `eval/eval.md`.",
        "",
        "## What the numbers show",
        "",
        *wer_findings(res),
        *training_findings(summaries),
        "",
        "## Routing (Switch vs omni, seed 0, on dev)",
        "",
        *routing_findings(analyses),
        "",
    ]
    for r in analyses:
        text += [f"### {r}", ""]
        text += [f"![{r} {p}](analysis/{r}/{p}.png)" for p in
                 ("usage", "entropy", "agreement", "rasters")]  # fmt: skip
        text.append("")
    text += ["## Training", "",
             f"| run | train CTC (mean of last {CTC_LAST} logged steps) | dev WER logged in "
             "training (utterances) |", "| --- | ---: | ---: |"]  # fmt: skip
    for r in ROUTERS:
        for name, s in summaries[r].items():
            ctc = "–" if math.isnan(s["ctc"]) else f"{s['ctc']:.3f}"
            text.append(f"| {name} | {ctc} | {_pct(s['dev_wer'])} ({s['dev_utterances']}) |")
    text += ["", "The logged dev WER covers only the first `train.dev_max_batches` dev batches "
             "(the utterance count in brackets; `configs/demo.yaml` sets 4 to keep training "
             "fast); the tables above score the whole dev set.", ""]  # fmt: skip
    text += ["## Stages", "", "| stage | seconds | | command |", "| --- | ---: | --- | --- |"]
    for t in times:
        text.append(f"| {t.name} | {t.seconds:.0f} | {'reused' if t.reused else 'ran'} | "
                    f"`{t.command}` |")  # fmt: skip
    text += ["", f"Stages run in this invocation: {total:.0f} s.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(text))
    return path, table
