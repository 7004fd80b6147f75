"""Auxiliary-loss-free balancing: the expert-bias update (DeepSeek-V3, arXiv 2412.19437).

    meter = LoadMeter()
    out = model(audio, audio_lens)       # out.load: [MoE layers, E] routes per expert
    meter.add(out.load)                  # every micro batch that is trained on
    engine.step()
    meter.update(model)                  # after each optimizer step; collective

With ``model.moe.expert_bias`` each :class:`~omni_ds.model.router.Router` holds ``balance_bias``
(one row, or one per layer sharing it with ``expert_bias_per_layer``), added to the router
probabilities to choose the experts only. After each optimizer step the routes each expert
received during that step (first and second choices before capacity drops, every micro batch)
are summed over all ranks, then per bias row ``b += rate * sign(mean load - load)``, recentred
to mean 0 as torchtitan does (Megatron-Core's ``get_updated_expert_bias`` leaves out the
recentring; a constant shift of all experts changes no choice). A shared router's single row
sees the load summed over the layers it serves.

Every rank sums the same integer counts (exact) and applies the same update to the same bias, so
the bias is bitwise identical on every rank after every step without a broadcast; it lives in the
checkpoint's dense module state like the router weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omni_ds import dist
from omni_ds.model.moe import MoEFeedForward


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE blocks of ``model`` in layer order (the rows of ``EncoderOutput.load``)."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@torch.no_grad()
def update_biases(model: nn.Module, load: Tensor) -> None:
    """Move every router's ``balance_bias`` by the load ``[MoE layers, E]`` of one step, summed
    over all ranks (module docstring)."""
    counts: dict[int, tuple] = {}  # id(router) -> (router, its summed load per bias row)
    for layer, block in enumerate(moe_layers(model)):
        bias = block.router.balance_bias
        if bias is None:
            continue
        _, rows = counts.setdefault(id(block.router), (block.router, torch.zeros_like(bias)))
        # one row: the load of every layer sharing the router; per layer: each its own row
        rows[block.router_layer if rows.shape[0] > 1 else 0] += load[layer].to(rows)
    for router, rows in counts.values():
        delta = torch.sign(rows.mean(-1, keepdim=True) - rows) * router.bias_rate
        router.balance_bias.add_(delta - delta.mean(-1, keepdim=True))


class LoadMeter:
    """Routes per expert over the micro batches of one optimizer step, then the bias update."""

    def __init__(self) -> None:
        self.load: Tensor | None = None

    def add(self, load: Tensor | None) -> None:
        """One trained micro batch's ``EncoderOutput.load`` (None: no expert bias)."""
        if load is not None:
            load = load.detach()
            self.load = load.clone() if self.load is None else self.load + load

    def update(self, model: nn.Module) -> None:
        """After an optimizer step: sum the step's load over ranks, update the biases, reset.
        Collective when the model has expert bias (every rank's config is the same)."""
        if self.load is None:
            return
        update_biases(model, dist.sum_tensor_over_ranks(self.load))
        self.load = None
