"""The routing comparison of docs/research.md: omni + balance loss vs omni + expert bias (no
balance loss) vs omni with 2 router groups, on the embedded corpus, several seeds.

Not a speed benchmark: every variant is ``configs/demo.yaml`` (the `make demo` omni model, 250
steps on 2 processes with ep_size 2) with one change, trained once per seed (``train.seed``,
which also sets the data order), exported and scored by ``omni-ds eval`` on dev and the four
shifted test sets; each run also writes a routing trace (every 25 steps). Finished stages are
reused, so an interrupted study continues where it stopped.

    nice -n 19 python benchmarks/routing_study.py --out runs/routing_study --seeds 0 1 2

``omni-ds eval`` groups the seeds of each variant (mean ± std) and gives every pair of variants
a 95% paired bootstrap interval (utterances and seeds resampled); this prints its eval.md, and
the last traced step's cross-layer NMI, usage entropy and busiest expert's share (mean ± std over
the seeds), and writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "omni_ds.cli"]
SETS = ("dev", "test_unseen_speakers", "test_fast", "test_noisy", "test_telephone")
VARIANTS = {
    "omni_loss": [],
    "omni_bias": ["model.moe.expert_bias=true", "model.moe.balance_loss_weight=0.0"],
    "groups2": ["model.moe.router_groups=2"],
}
BASELINE = "omni_loss"


def run(argv: list[str], env: dict | None = None) -> None:
    print("$", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def corpus(data: Path) -> Path:
    tokenizer = data / "letters.model"
    if not (data / "test_telephone" / "index.json").is_file():
        run([*CLI, "synth", str(data)])
    if not tokenizer.is_file():
        run([*CLI, "train-tokenizer", str(data / "train"), "--vocab", "32", "--model-type",
             "char", "--out", str(data / "letters")])  # fmt: skip
    return tokenizer


def train(out: Path, data: Path, tokenizer: Path, name: str, seed: int, steps: int) -> Path:
    run_dir = out / "runs" / f"{name}_s{seed}"
    if not (run_dir / "checkpoints" / f"step_{steps}").is_dir():
        sets = [*VARIANTS[name], f"train.seed={seed}", f"train.run_dir={run_dir}",
                f"train.max_steps={steps}", "train.routing_trace_every=25",
                "train.progress_bar=false", f"data.train=[{data / 'train'}]",
                f"data.dev={{dev: {data / 'dev'}}}", f"data.tokenizer={tokenizer}",
                "model.moe.ep_size=2"]  # fmt: skip
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "-m", "omni_ds.cli", "train", "configs/demo.yaml"]  # fmt: skip
        run([*launch, *(a for s in sets for a in ("--set", s))],
            env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})  # fmt: skip
    model = out / "models" / f"{name}_s{seed}"
    if not (model / "model.safetensors").is_file():
        run([*CLI, "export", str(run_dir), "--out", str(model)])
    return model


def last_trace(run_dir: Path) -> dict[str, float]:
    """The last traced step of a run: cross-layer NMI, usage entropy, busiest expert's share."""
    from omni_ds.eval.trace_analysis import analyze_trace

    curves, _ = analyze_trace(run_dir)
    return {"nmi": float(curves.nmi[-1]),
            "usage_entropy_bits": float(curves.usage_entropy_bits[-1].mean()),
            "busiest_share": float(curves.load[-1].max(-1).mean())}  # fmt: skip


def summarize(out: Path, seeds: list[int]) -> dict:
    """omni-ds eval's seed groups (mean ± std) and paired bootstrap intervals of the mean WER
    over the four shifted sets, with the routing trace's last step per variant."""
    report = json.loads((out / "eval" / "eval.json").read_text())
    groups = {g["name"]: g for g in report["groups"]}
    summary: dict = {"variants": {}, "pairs": []}
    for name in VARIANTS:
        traces = [last_trace(out / "runs" / f"{name}_s{s}") for s in seeds]
        summary["variants"][name] = {
            "runs": groups[name]["runs"],
            "wer_mean_std": groups[name]["wer"],
            "trace_last_mean_std": {
                k: [
                    float(np.mean([t[k] for t in traces])),
                    float(np.std([t[k] for t in traces], ddof=1)),
                ]
                for k in traces[0]
            },  # fmt: skip
        }
    for pair in report["pairs"]:
        if pair["metric"] == "wer" and BASELINE in (pair["a"], pair["b"]):
            summary["pairs"].append({k: pair[k] for k in ("a", "b", "intervals")})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/routing_study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()
    out = args.out.resolve()
    tokenizer = corpus(out / "data")
    models = [train(out, out / "data", tokenizer, name, seed, args.steps)
              for seed in args.seeds for name in VARIANTS]  # fmt: skip
    if not (out / "eval" / "eval.json").is_file():
        run([*CLI, "eval", *map(str, models), "--out", str(out / "eval"),
             *(a for s in SETS for a in ("--test-set", f"{s}={out / 'data' / s}"))])  # fmt: skip
    summary = summarize(out, args.seeds)
    print((out / "eval" / "eval.md").read_text())
    print("| variant | cross-layer NMI | usage entropy (bits) | busiest expert's share |")
    for name, v in summary["variants"].items():
        t = v["trace_last_mean_std"]
        print(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in t.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
