"""A tiny MoE classifier on stock ``deepspeed.moe.layer.MoE`` for engine-level tests.

It exercises what the training code must handle (expert parameters, expert parallelism, dropout
that draws from the RNG) without depending on the speech model; batches are fixed random tensors
generated from a seed so every rank and every run sees the same data.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyMoE(nn.Module):
    def __init__(self, d: int = 16, classes: int = 5, experts: int = 4, ep_size: int = 1):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(8, d)
        self.drop = nn.Dropout(0.1)
        self.moes = nn.ModuleList(
            MoE(
                hidden_size=d,
                expert=nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)),
                num_experts=experts,
                ep_size=ep_size,
                k=1,
                drop_tokens=False,
                use_rts=False,
            )
            for _ in range(2)
        )
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.inp(x))
        aux = h.new_zeros(())
        for moe in self.moes:
            out, l_aux, _ = moe(h)
            h = h + out
            aux = aux + l_aux
        logits = self.out(h).flatten(0, 1).float()
        return nn.functional.cross_entropy(logits, y.flatten()) + 0.01 * aux


def batch(step: int, rank: int, b: int = 4, t: int = 8, dtype=torch.float32):
    """Batch number ``step`` of ``rank``: a learnable mapping (label = argmax of 5 features)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(b, t, 8, generator=g)
    y = x[..., :5].argmax(-1)
    return x.to(dtype), y
