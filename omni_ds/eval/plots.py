"""PNG figures of a :class:`~omni_ds.analysis.RoutingAnalysis` (matplotlib, headless Agg).

    paths = save_plots(analysis, out_dir, title="omni_8x84m on dev")

writes ``usage.png`` (layer × expert heat-map), ``entropy.png`` (bars per layer),
``agreement.png`` (layer × layer NMI heat-map) and ``rasters.png`` (time × layer expert index,
one panel per utterance).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from omni_ds.eval.analysis import RoutingAnalysis  # noqa: E402


def _annotate(ax, values: np.ndarray, fmt: str, dark_below: float) -> None:
    if values.size > 400:  # unreadable anyway
        return
    for (i, j), v in np.ndenumerate(values):
        color = "white" if v < dark_below else "black"
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)


def _layer_labels(n: int) -> list[str]:
    return [f"MoE {i}" for i in range(n)]


def plot_usage(usage: np.ndarray, path: Path, subtitle: str = "") -> None:
    L, E = usage.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * E), 1.5 + 0.45 * L), layout="constrained")
    vmax = max(float(usage.max()), 1e-9)
    im = ax.imshow(usage, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    _annotate(ax, 100 * usage, "{:.0f}", dark_below=60 * vmax)
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(L), _layer_labels(L))
    ax.set_xlabel("expert")
    ax.set_title(f"Expert usage per MoE layer\n(% of frames){subtitle}")
    fig.colorbar(im, ax=ax, label="share of frames")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy(analysis: RoutingAnalysis, path: Path, subtitle: str = "") -> None:
    L = analysis.usage.shape[0]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.6 * L), 4.2), layout="constrained")
    x = np.arange(L)
    ax.bar(x - 0.2, analysis.usage_entropy_bits, 0.4, color="tab:blue", label="expert usage")
    ax.bar(
        x + 0.2, analysis.router_entropy_bits, 0.4, color="tab:orange", label="router, per frame"
    )
    ax.axhline(np.log2(analysis.num_experts), color="k", ls="--", lw=1, label="log2 E (uniform)")
    ax.set_xticks(range(L), _layer_labels(L), rotation=45, ha="right")
    ax.set_ylabel("bits")
    ax.set_ylim(0, np.log2(analysis.num_experts) * 1.1)
    ax.set_title(f"Routing entropy per MoE layer{subtitle}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_agreement(matrix: np.ndarray, path: Path, subtitle: str = "") -> None:
    L = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 0.55 * L), 1.8 + 0.5 * L), layout="constrained")
    im = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
    _annotate(ax, matrix, "{:.2f}", dark_below=0.6)
    ax.set_xticks(range(L), _layer_labels(L), rotation=45, ha="right")
    ax.set_yticks(range(L), _layer_labels(L))
    ax.set_title(f"Cross-layer agreement\n(NMI of expert choices){subtitle}")
    fig.colorbar(im, ax=ax, label="normalised mutual information")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rasters(
    rasters: dict[str, np.ndarray], num_experts: int, path: Path, subtitle: str = ""
) -> None:
    n = len(rasters)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 1.6 * n), squeeze=False, layout="constrained")
    cmap = ListedColormap(
        plt.get_cmap("tab10" if num_experts <= 10 else "tab20").colors[:num_experts]
    )
    norm = BoundaryNorm(np.arange(num_experts + 1) - 0.5, num_experts)
    im = None
    for ax, (key, raster) in zip(axes[:, 0], rasters.items()):
        im = ax.imshow(raster, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(key, fontsize=9)
        ax.set_yticks(range(raster.shape[0]), _layer_labels(raster.shape[0]), fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("frame (40 ms)", fontsize=8)
    fig.suptitle(f"Expert index per frame (time × layer){subtitle}")
    if im is not None:
        fig.colorbar(im, ax=axes[:, 0].tolist(), ticks=range(num_experts), label="expert")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_plots(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """Write the four PNGs into ``out_dir``; ``title`` (e.g. the model name) is appended."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sub = f"\n{title}" if title else ""
    paths = [out_dir / n for n in ("usage.png", "entropy.png", "agreement.png", "rasters.png")]
    plot_usage(analysis.usage, paths[0], sub)
    plot_entropy(analysis, paths[1], sub)
    plot_agreement(analysis.agreement, paths[2], sub)
    if analysis.rasters:
        plot_rasters(analysis.rasters, analysis.num_experts, paths[3], sub)
    else:
        paths.pop()
    return paths
