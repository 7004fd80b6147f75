"""A small stack of pre-LN MoE feed-forward blocks: the MoE tests' stand-in for the encoder.

It wires the routers the way the encoder does: for omni one ``Router``, registered before the
layers (so the canonical parameter name is ``router.wg.weight``), then the same object in every
block; for switch one per block.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from omni_ds.config.model import MoEConfig
from omni_ds.model.moe import FeedForward, MoEFeedForward
from omni_ds.model.router import Router


class MoEStack(nn.Module):
    def __init__(
        self,
        cfg: MoEConfig,
        *,
        d_in=6,
        d_model=16,
        d_ff=32,
        layers=3,
        classes=5,
        checkpoint: str | None = None,
    ):
        """``checkpoint``: None, ``reentrant`` or ``non_reentrant`` activation checkpointing."""
        super().__init__()
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.dims = dict(d_in=d_in, d_model=d_model, d_ff=d_ff, layers=layers, classes=classes)
        self.router = Router(cfg, d_model, layers=layers) if cfg.router == "omni" else None
        self.proj = nn.Linear(d_in, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        if cfg.router == "dense":
            self.ffns = nn.ModuleList(FeedForward(d_model, d_ff) for _ in range(layers))
        else:
            self.ffns = nn.ModuleList(
                MoEFeedForward(
                    cfg,
                    d_model,
                    d_ff,
                    router=self.router or Router(cfg, d_model),
                    router_layer=i if self.router else 0,
                )  # fmt: skip
                for i in range(layers)
            )
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, targets: Tensor | None = None):
        """Logits and the summed router losses, or with ``targets`` the training loss."""
        if targets is not None:
            return self.loss(x, pad_mask, targets)
        return self.run(x, pad_mask)

    def _block(self, i: int, h: Tensor, pad_mask: Tensor | None, return_stats: bool):
        res = self.ffns[i](self.norms[i](h), pad_mask, return_stats=return_stats)
        return h + res.out, res.balance_loss, res.z_loss, res.stats

    def run(self, x: Tensor, pad_mask: Tensor | None = None, return_stats=False):
        h = self.proj(x)
        balance = z = h.new_zeros(())
        stats = []
        for i, (norm, ffn) in enumerate(zip(self.norms, self.ffns)):
            if self.cfg.router == "dense":
                h = h + ffn(norm(h))
            elif self.checkpoint:
                reentrant = self.checkpoint == "reentrant"
                args = (self._block, i, h, pad_mask, False)
                h, b, zl, st = checkpoint(*args, use_reentrant=reentrant)
            else:
                h, b, zl, st = self._block(i, h, pad_mask, return_stats)
            if self.cfg.router != "dense":
                balance, z = balance + b, z + zl
                stats.append(st)
        return self.head(h), balance, z, stats

    def loss(self, x: Tensor, pad_mask: Tensor, targets: Tensor) -> Tensor:
        """Frame cross-entropy over real frames plus the weighted, layer-summed router losses."""
        logits, balance, z, _ = self.run(x, pad_mask)
        ce = F.cross_entropy(logits[~pad_mask], targets[~pad_mask])
        return ce + self.cfg.balance_loss_weight * balance + self.cfg.z_loss_weight * z


def untie(omni: MoEStack) -> MoEStack:
    """A Switch model with the same weights: every layer gets its own copy of the shared router."""
    switch = MoEStack(dataclasses.replace(omni.cfg, router="switch"), **omni.dims)
    result = switch.load_state_dict(omni.state_dict(), strict=False)
    unexpected = result.unexpected_keys
    assert not result.missing_keys and all(k.startswith("router.") for k in unexpected), result
    return switch


def batch(seed: int, lengths: list[int], d_in=6, classes=5, pad_to: int | None = None):
    """Random features [B, T, d_in], pad mask (True = pad) and frame targets for ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    t = pad_to or max(lengths)
    x = torch.randn(len(lengths), t, d_in, generator=g)
    pad = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    x = x.masked_fill(pad[..., None], 0.0)
    targets = torch.randint(0, classes, (len(lengths), t), generator=g)
    return x, pad, targets
