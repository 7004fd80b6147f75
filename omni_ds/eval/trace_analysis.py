"""The routing trace of a training run as curves over steps (``omni-ds analyze --trace RUN_DIR``).

Reads ``RUN_DIR/routing_trace/rank<R>.jsonl`` (written with ``train.routing_trace_every``; the
format: :mod:`omni_ds.train.routing_trace`) and computes, at every traced step, with every rank's
record of that step pooled:

- **cross-layer NMI**: the mean over pairs of distinct MoE layers of the normalised mutual
  information between their first-choice experts on the traced frames (the analysis of
  :mod:`omni_ds.eval.analysis`, :func:`~omni_ds.eval.analysis.agreement_matrix`, as a curve);
- **usage entropy** per layer, in bits, of the share of routes each expert received over all real
  frames of the step's batches (log2 E = perfectly even);
- **expert load** ``[layer, expert]``: those shares;
- **selection bias** per layer (runs with ``model.moe.expert_bias``), and whether it was
  identical on every rank.

:func:`save_trace_plots` draws ``trace.png`` (NMI, entropy and the busiest expert's share over
steps) and ``trace_load.png`` (one panel per layer: each expert's share over steps), plus
``trace_bias.png`` when the run has a bias.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from omni_ds.eval.analysis import agreement_matrix, entropy_bits, mean_offdiagonal  # noqa: E402

TRACE_GLOB = "routing_trace/rank*.jsonl"
RESUME = "resume"
"""``kind`` of the line a resume appends (``omni_ds.train.metrics.RESUME``, a layer above)."""


@dataclasses.dataclass(kw_only=True)
class TraceCurves:
    """Per traced step (arrays indexed by step, then MoE layer, then expert)."""

    num_experts: int
    ranks: int
    steps: np.ndarray
    """[S] traced optimizer steps."""
    frames: np.ndarray
    """[S] traced frames per step, summed over ranks (the NMI's sample)."""
    nmi: np.ndarray
    """[S] mean cross-layer NMI of the first choices (nan with one MoE layer)."""
    usage_entropy_bits: np.ndarray
    """[S, L] entropy of each layer's expert shares."""
    load: np.ndarray
    """[S, L, E] share of the step's routes per expert; rows sum to 1."""
    bias: np.ndarray | None
    """[S, L, E] selection bias (rank 0's), or None without expert bias."""
    bias_identical_across_ranks: bool | None

    def to_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "ranks": self.ranks,
            "steps": self.steps.tolist(),
            "frames": self.frames.tolist(),
            "mean_crosslayer_nmi": self.nmi.tolist(),
            "usage_entropy_bits": self.usage_entropy_bits.tolist(),
            "max_entropy_bits": float(np.log2(self.num_experts)),
            "load": self.load.tolist(),
            "bias": None if self.bias is None else self.bias.tolist(),
            "bias_identical_across_ranks": self.bias_identical_across_ranks,
        }


def read_trace(run_dir: str | Path) -> dict[int, list[dict]]:
    """step -> the records of that step, one per rank, in rank order."""
    files = sorted(Path(run_dir).glob(TRACE_GLOB))
    if not files:
        raise FileNotFoundError(
            f"{run_dir} has no {TRACE_GLOB}; train with --set train.routing_trace_every=N"
        )
    by_step: dict[int, list[dict]] = {}
    for f in files:
        records: list[dict] = []
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("kind") == RESUME:  # the resumed attempt redid the steps past it
                records = [r for r in records if r["step"] <= record["step"]]
            else:
                records.append(record)
        for record in records:
            by_step.setdefault(record["step"], []).append(record)
    return {s: sorted(rs, key=lambda r: r["rank"]) for s, rs in sorted(by_step.items())}


def trace_curves(by_step: dict[int, list[dict]]) -> TraceCurves:
    """The curves of a trace (module docstring)."""
    first = next(iter(by_step.values()))[0]
    num_experts = first["num_experts"]
    nmi, entropy, load, bias, frames = [], [], [], [], []
    identical = True
    for records in by_step.values():
        layers = len(records[0]["expert"])
        choices = [np.concatenate([np.asarray(r["expert"][i], dtype=np.int64) for r in records])
                   for i in range(layers)]  # fmt: skip
        frames.append(len(choices[0]))
        nmi.append(mean_offdiagonal(agreement_matrix(choices, num_experts)))
        counts = np.sum([np.asarray(r["load"], dtype=np.float64) for r in records], axis=0)
        shares = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
        load.append(shares)
        entropy.append([entropy_bits(row) for row in shares])
        if records[0]["bias"] is not None:
            bias.append(np.asarray(records[0]["bias"]))
            identical &= all(r["bias"] == records[0]["bias"] for r in records)
    has_bias = len(bias) == len(by_step)
    return TraceCurves(
        num_experts=num_experts,
        ranks=max(len(rs) for rs in by_step.values()),
        steps=np.array(list(by_step)),
        frames=np.array(frames),
        nmi=np.array(nmi),
        usage_entropy_bits=np.array(entropy),
        load=np.array(load),
        bias=np.array(bias) if has_bias else None,
        bias_identical_across_ranks=identical if has_bias else None,
    )


def _layer_grid(n: int, title: str):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")  # fmt: skip
    fig.suptitle(title)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def save_trace_plots(curves: TraceCurves, out: Path, title: str) -> list[Path]:
    """Write the trace PNGs into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    steps, L, E = curves.steps, curves.load.shape[1], curves.num_experts
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    fig.suptitle(title)
    axes[0].plot(steps, curves.nmi, marker=".")
    axes[0].set(title="mean cross-layer NMI (first choice)", xlabel="step", ylim=(0, 1))
    for layer in range(L):
        axes[1].plot(steps, curves.usage_entropy_bits[:, layer], label=f"MoE {layer}")
    axes[1].axhline(np.log2(E), color="grey", linestyle="--", label="log2 E (even)")
    axes[1].set(title="expert-usage entropy (bits)", xlabel="step", ylim=(0, np.log2(E) * 1.05))
    axes[1].legend(fontsize=7)
    for layer in range(L):
        axes[2].plot(steps, curves.load[:, layer].max(-1), label=f"MoE {layer}")
    axes[2].axhline(1 / E, color="grey", linestyle="--", label="1/E (even)")
    axes[2].set(title="busiest expert's share of the routes", xlabel="step", ylim=(0, 1))
    axes[2].legend(fontsize=7)
    paths = [out / "trace.png"]
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = _layer_grid(L, f"{title}: expert load over training")
    for layer, ax in enumerate(axes):
        ax.stackplot(steps, curves.load[:, layer].T, labels=[f"expert {e}" for e in range(E)])
        ax.set(title=f"MoE {layer}", xlabel="step", ylim=(0, 1))
    axes[0].set_ylabel("share of routes")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    paths.append(out / "trace_load.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if curves.bias is not None:
        fig, axes = _layer_grid(L, f"{title}: selection bias over training")
        for layer, ax in enumerate(axes):
            for e in range(E):
                ax.plot(steps, curves.bias[:, layer, e], label=f"expert {e}")
            ax.set(title=f"MoE {layer}", xlabel="step")
        axes[0].set_ylabel("bias added to the probability")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
        paths.append(out / "trace_bias.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def analyze_trace(run_dir: str | Path, out: str | Path | None = None) -> tuple[TraceCurves, Path]:
    """Read ``run_dir``'s trace, write ``trace.json`` and the plots into ``out`` (default
    ``RUN_DIR/analysis``); returns the curves and ``out``."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "analysis"
    curves = trace_curves(read_trace(run_dir))
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace.json").write_text(json.dumps(curves.to_dict(), indent=1) + "\n")
    save_trace_plots(curves, out, title=run_dir.resolve().name)
    return curves, out
