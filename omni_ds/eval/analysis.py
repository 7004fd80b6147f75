"""Router analysis: what the experts are used for, layer by layer and across layers.

Reproduces the Omni-router paper's analyses on a test set, from the per-layer
``RoutingStats`` the encoder returns with ``return_stats=True`` (one entry per MoE layer, rows =
the non-pad frames in row-major (batch, time) order):

- **usage** ``[L, E]``: the share of routing assignments (frames × k) each expert receives;
- **usage entropy** per layer, in bits (log2 E = perfectly even, 0 = one expert takes all);
- **router entropy** per layer, in bits: the mean over frames of the entropy of the router's
  distribution over experts (the model's per-batch ``RoutingStats.entropy``, in nats, averaged
  with each batch weighted by its frames, then divided by ln 2); low = confident routing;
- **mean top-1 probability** per layer (how confident the router is);
- **agreement** ``[L, L]``: normalised mutual information between the top-1 expert choices of
  every pair of MoE layers over the same frames, ``NMI(A, B) = 2 I(A; B) / (H(A) + H(B))``
  (the arithmetic normalisation, scikit-learn's default); 1 on the diagonal; 1 when one layer's
  choice determines the other's, 0 when they are independent;
- **rasters**: top-1 expert index per frame (time × layer) for the first few utterances.

    collector = RoutingCollector(num_experts=8)
    for batch in loader:
        out = model(batch["audio"], batch["audio_lens"], return_stats=True)
        collector.add(out.routing, out.out_lens, batch["keys"])
    result = collector.result()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a probability vector (zeros ignored)."""
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def normalized_mutual_info(a: np.ndarray, b: np.ndarray, num_experts: int) -> float:
    """``2 I(A;B) / (H(A) + H(B))`` of two equally long sequences of expert ids.

    Two constant sequences count as identical (1.0), as in scikit-learn.
    """
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-d choice arrays of one length, got {a.shape} and {b.shape}")
    joint = np.bincount(a * num_experts + b, minlength=num_experts**2).astype(np.float64)
    joint = joint.reshape(num_experts, num_experts) / len(a)
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    h_a, h_b = entropy_bits(pa), entropy_bits(pb)
    if h_a + h_b == 0:
        return 1.0
    nz = joint > 0
    mutual = float((joint[nz] * np.log2(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, 2 * mutual / (h_a + h_b))


def agreement_matrix(choices: Sequence[np.ndarray], num_experts: int) -> np.ndarray:
    """``[L, L]`` NMI between the top-1 choices of every pair of layers (symmetric, unit diagonal)."""
    n = len(choices)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = normalized_mutual_info(choices[i], choices[j], num_experts)
    return out


@dataclasses.dataclass(kw_only=True)
class RoutingAnalysis:
    """The analysis of one model on one test set (arrays indexed by MoE layer, then expert)."""

    num_experts: int
    frames: int
    """Non-pad frames analysed."""
    usage: np.ndarray
    """[L, E] share of routing assignments per expert; rows sum to 1."""
    usage_entropy_bits: np.ndarray
    """[L] entropy of each usage row, in bits."""
    router_entropy_bits: np.ndarray
    """[L] mean per-frame entropy of the router distribution, in bits."""
    mean_top1_prob: np.ndarray
    """[L] mean router probability of the chosen (first) expert."""
    agreement: np.ndarray
    """[L, L] normalised mutual information between layers' top-1 choices."""
    rasters: dict[str, np.ndarray]
    """Utterance key -> [L, T] top-1 expert index per frame."""

    def to_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "num_moe_layers": int(self.usage.shape[0]),
            "frames": self.frames,
            "usage": self.usage.tolist(),
            "usage_entropy_bits": self.usage_entropy_bits.tolist(),
            "max_entropy_bits": float(np.log2(self.num_experts)),
            "router_entropy_bits": self.router_entropy_bits.tolist(),
            "mean_top1_prob": self.mean_top1_prob.tolist(),
            "agreement_nmi": self.agreement.tolist(),
            "mean_offdiagonal_nmi": mean_offdiagonal(self.agreement),
            "rasters": {k: v.tolist() for k, v in self.rasters.items()},
        }


def mean_offdiagonal(matrix: np.ndarray) -> float:
    """Mean over pairs of distinct layers: one number for "how much do layers agree"."""
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    return float((matrix.sum() - np.trace(matrix)) / (n * (n - 1)))


class RoutingCollector:
    """Accumulates per-layer routing over batches; :meth:`result` computes the analysis."""

    def __init__(self, num_experts: int, num_rasters: int = 4):
        self.num_experts = num_experts
        self.num_rasters = num_rasters
        self._experts: list[list[np.ndarray]] = []  # layer -> batches of [N, k]
        self._top_prob: list[list[np.ndarray]] = []
        self._entropy: list[list[tuple[float, int]]] = []  # layer -> (entropy, frames) per batch
        self.rasters: dict[str, np.ndarray] = {}

    def add(self, routing: Sequence, out_lens: torch.Tensor, keys: Sequence[str]) -> None:
        """One batch: ``routing`` = the encoder's ``RoutingStats`` list, ``out_lens [B]``."""
        lens = [int(n) for n in out_lens.tolist()]
        if not self._experts:
            self._experts = [[] for _ in routing]
            self._top_prob = [[] for _ in routing]
            self._entropy = [[] for _ in routing]
        if len(routing) != len(self._experts):
            raise ValueError(
                f"{len(routing)} MoE layers in this batch, {len(self._experts)} before"
            )
        experts = []
        for layer, stats in enumerate(routing):
            e = stats.expert.detach().cpu().numpy().astype(np.int64)
            if e.shape[0] != sum(lens):
                raise ValueError(
                    f"layer {layer}: {e.shape[0]} routed frames but out_lens sum to {sum(lens)}; "
                    "RoutingStats must hold exactly the non-pad frames"
                )
            experts.append(e)
            self._experts[layer].append(e)
            self._top_prob[layer].append(stats.prob.detach().float().cpu().numpy()[:, 0])
            self._entropy[layer].append((float(stats.entropy), e.shape[0]))
        starts = np.cumsum([0, *lens])
        for b, key in enumerate(keys):
            if len(self.rasters) >= self.num_rasters:
                break
            self.rasters[key] = np.stack([e[starts[b] : starts[b + 1], 0] for e in experts])

    def result(self) -> RoutingAnalysis:
        if not self._experts:
            raise ValueError("no batches were added; is the test set empty?")
        E = self.num_experts
        experts = [np.concatenate(batches) for batches in self._experts]
        usage = np.stack([np.bincount(e.ravel(), minlength=E)[:E] / e.size for e in experts])
        router_entropy = np.array(
            [sum(h * n for h, n in ent) / max(1, sum(n for _, n in ent)) for ent in self._entropy]
        ) / np.log(2)
        return RoutingAnalysis(
            num_experts=E,
            frames=int(experts[0].shape[0]),
            usage=usage,
            usage_entropy_bits=np.array([entropy_bits(u) for u in usage]),
            router_entropy_bits=router_entropy,
            mean_top1_prob=np.array([np.concatenate(p).mean() for p in self._top_prob]),
            agreement=agreement_matrix([e[:, 0] for e in experts], E),
            rasters=dict(self.rasters),
        )


def set_random_routing(model: torch.nn.Module, enabled: bool) -> int:
    """Switch the random-routing ablation on every MoE layer; returns how many were switched."""
    count = 0
    for module in model.modules():
        if hasattr(module, "random_routing"):
            module.random_routing = enabled
            count += 1
    return count
