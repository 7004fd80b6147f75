"""The routing trace: the routing of real training frames at regular steps, per rank.

Every ``train.routing_trace_every`` optimizer steps each rank appends one JSON line to
``RUN_DIR/routing_trace/rank<R>.jsonl`` describing the micro batch that completed the step:

    {"step": 200, "rank": 0, "num_experts": 4, "top_k": 1, "frames": 256,
     "expert": [[...], ...],   # [MoE layers][frames] first-choice expert of the first `frames`
                               # real frames of the batch (row-major: utterance, then time)
     "load":   [[...], ...],   # [MoE layers][E] routes per expert over ALL real frames of the batch
     "bias":   [[...], ...]}   # [MoE layers][E] the selection bias each layer used (expert_bias),
                               # or null

A record holds at most ``train.routing_trace_frames`` x MoE layers choices, so the trace grows by
a bounded amount per traced step. Like ``metrics.jsonl``, a resume appends a marker line and the
resumed attempt redoes the steps past its checkpoint; readers keep the redone records
(``omni_ds.train.metrics.read_records``). ``omni-ds analyze --trace RUN_DIR``
(:mod:`omni_ds.eval.trace_analysis`) turns it into curves over training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni_ds.model.balance import moe_layers
from omni_ds.train.metrics import JsonLines

TRACE_DIR = "routing_trace"


def trace_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / TRACE_DIR / f"rank{rank}.jsonl"


class RoutingTrace(JsonLines):
    """This rank's trace file; :meth:`due` says which steps to trace."""

    def __init__(self, run_dir: Path, rank: int, *, every: int, frames: int):
        super().__init__(trace_path(run_dir, rank))
        self.rank, self.every, self.frames = rank, every, frames

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def record(self, step: int, routing: list, model: torch.nn.Module) -> None:
        """Append step ``step``: ``routing`` = the encoder's per-layer ``RoutingStats`` of it."""
        blocks = moe_layers(model)
        num_experts = blocks[0].cfg.num_experts
        biases = [b.router.selection_bias(b.router_layer) for b in blocks]
        experts = [stats.expert for stats in routing]
        load = [torch.bincount(e.reshape(-1), minlength=num_experts) for e in experts]
        self.write({
            "step": step,
            "rank": self.rank,
            "num_experts": num_experts,
            "top_k": int(experts[0].shape[1]),
            "frames": min(self.frames, int(experts[0].shape[0])),
            "expert": [e[: self.frames, 0].tolist() for e in experts],
            "load": [c.tolist() for c in load],
            "bias": None if biases[0] is None else [b.tolist() for b in biases],
        })  # fmt: skip
