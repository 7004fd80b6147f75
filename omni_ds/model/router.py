"""The router: W_r (E x d, optional bias) choosing each frame's top-k experts. Start reading here.

The Omni-router's idea is in *how many* routers a model has, not in this class: the encoder
(:mod:`omni_ds.model.encoder`) makes **one** :class:`Router` for ``router: omni`` and hands that
same object to every :class:`omni_ds.model.moe.MoEFeedForward`, or one per MoE layer for
``router: switch`` (Switch Transformer), or one per group of consecutive layers with
``router_groups``. Shared, each layer still applies it to its own layer-normed
hidden states, so decisions can differ between layers, but there is exactly one router parameter
tensor and its gradient is the sum of every layer's contribution.

The router is a DeepSpeed ``TopKGate`` (it sits at ``MoE.deepspeed_moe.gate``), so DeepSpeed's
engine lists it as a gate, keeps it out of the expert files of a checkpoint and all-reduces it as a
dense parameter. Three things differ from the stock gate:

* ``_set_ep_group`` accepts being told the *same* expert-parallel group again: the engine calls it
  once per MoE layer, and the stock assert (``Attempting to override an existing ep_group``) would
  fire on the second layer. A *different* group still raises.
* Padded frames never reach it: :meth:`route` sees only real frames, so pads take no capacity and
  count in none of f_i, P_i, the z-loss or the statistics (the stock ``used_token`` masks only
  f_i, and only for top-1).
* Routing noise (jitter, random token selection, sampling of the 2nd expert) is drawn only in
  training mode; the stock gate also draws RTS and 2nd-expert noise in eval.

With ``expert_bias`` (auxiliary-loss-free balancing, DeepSeek-V3) a per-expert bias
(``balance_bias``, one row per router or per sharing layer) is added to the probabilities to
choose the experts; the combine weights stay the unbiased probabilities, and the bias moves only
by :mod:`omni_ds.model.balance` after each optimizer step, never by gradient.

Without noise, padding and bias the decisions are exactly DeepSpeed's ``top1gating``/``top2gating``
(same capacity, same dropped tokens, same combine weights); ``tests/test_router.py`` checks it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter
from torch import Tensor, nn

from omni_ds.config.model import MoEConfig


@dataclasses.dataclass
class Routing:
    """One layer's routing of N real (non-pad) frames to k experts each."""

    expert: Tensor
    """[N, k] int64: the chosen experts, before capacity drops."""
    kept: Tensor
    """[N, k] bool: the route fits in its expert's capacity."""
    slot: Tensor
    """[N, k] int64: position of the frame in its expert's capacity buffer (0 where dropped)."""
    weight: Tensor
    """[N, k] fp32: combine weight of each route (0 where dropped); carries the router gradient."""
    prob: Tensor
    """[N, E] fp32: router probabilities."""
    capacity: int
    """Per-expert capacity on this rank (the stock dispatch's buffer size)."""
    balance_loss: Tensor
    """E * sum_i f_i * P_i (f_i from the first choice, before drops), unweighted."""
    z_loss: Tensor
    """mean over frames of logsumexp(logits)^2, unweighted."""
    load: Tensor | None = None
    """[E] int64: routes (frames x k, before drops) per expert; with ``expert_bias`` only."""

    def deepspeed_routes(self, capacity: int) -> tuple:
        """The 7-tuple ``MOELayer.forward`` expects from its gate (sparse routes, [k, N] each)."""
        indices = torch.where(self.kept, self.expert, torch.full_like(self.expert, -1))
        counts = torch.bincount(indices[self.kept], minlength=self.prob.shape[1])
        return (
            self.balance_loss,
            torch.tensor(capacity),
            self.prob.shape[1],
            indices.t().int().contiguous(),
            self.slot.t().int().contiguous(),
            self.weight.t().contiguous(),
            counts,
        )


def gating_kwargs(cfg: MoEConfig) -> dict:
    """The gating settings DeepSpeed's ``MoE`` and ``TopKGate`` both take, from our config."""
    return dict(
        k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor,
        min_capacity=cfg.min_capacity,
        drop_tokens=not cfg.dropless,
        use_rts=cfg.use_rts,
        top2_2nd_expert_sampling=cfg.second_expert_sampling,
    )


class Router(TopKGate):
    """W_r with DeepSpeed's top-1/top-2 gating, applied to real frames only.

    ``layers``: how many MoE layers share this router (they call :meth:`route` with their
    ``layer`` index 0..layers-1); it sizes the per-layer balancing bias."""

    def __init__(self, cfg: MoEConfig, d_model: int, *, layers: int = 1):
        super().__init__(d_model, cfg.num_experts, **gating_kwargs(cfg))
        if cfg.router_bias:
            self.wg = nn.Linear(d_model, cfg.num_experts, bias=True)
        self.jitter = cfg.jitter
        # Auxiliary-loss-free balancing (omni_ds.model.balance updates it). A buffer: in the
        # checkpoint's dense module state, no gradient, no optimizer state. Its name must not
        # contain "expert": DeepSpeed would file it with the experts' weights.
        rows = layers if cfg.expert_bias_per_layer else 1
        bias = torch.zeros(rows, cfg.num_experts) if cfg.expert_bias else None
        self.register_buffer("balance_bias", bias)
        self.bias_rate = cfg.expert_bias_rate

    def _apply(self, fn, recurse=True):
        # The bias stays fp32 when the engine casts the model to bf16/fp16: its 1e-3 steps
        # would vanish in bf16's 8-bit mantissa.
        super()._apply(fn, recurse)
        if self.balance_bias is not None:
            self.balance_bias = self.balance_bias.float()
        return self

    def _set_ep_group(self, ep_group) -> None:
        if self.ep_group is not None and ep_group is not self.ep_group:
            raise RuntimeError("a shared router serves one expert-parallel group; got a second one")
        self.ep_group = ep_group

    def route(self, x: Tensor, *, layer: int = 0, random_experts: bool = False) -> Routing:
        """Route real frames ``x`` [N, d] of MoE layer ``layer`` (of the layers sharing this
        router); ``random_experts`` picks uniform random experts."""
        x = x.float()
        if self.training and self.jitter > 0:
            x = multiplicative_jitter(x, device=x.device, epsilon=self.jitter)
        # .float() is a no-op view for an fp32 weight and a differentiable copy for bf16: either
        # way the gradient lands on the one shared Parameter, never on a per-layer copy.
        bias = None if self.wg.bias is None else self.wg.bias.float()
        logits = F.linear(x, self.wg.weight.float(), bias)
        prob = logits.softmax(dim=-1)
        n, num_experts = logits.shape
        denom = max(n, 1)  # a rank may hold no real frame; keep the losses finite and in the graph

        first_score = torch.rand_like(prob) if random_experts else prob
        shift = self.selection_bias(layer)
        if shift is not None and not random_experts:
            # DeepSeek-V3's biased scores choose the experts (and so f_i of the balance loss);
            # the combine weights below stay the unbiased prob.
            first_score = prob.detach() + shift
        first = first_score.argmax(dim=-1)
        mask1 = F.one_hot(first, num_experts)
        balance = num_experts * (prob.sum(0) / denom * mask1.sum(0) / denom).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).sum() / denom
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            expert, kept, slot, weight, capacity = self._top1(prob, mask1, first, cf)
        else:
            second_score = first_score if random_experts or shift is not None else logits.detach()
            if self.training and self.top2_2nd_expert_sampling and not random_experts:
                second_score = second_score - torch.empty_like(second_score).exponential_().log()
            second = second_score.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1)
            expert, kept, slot, weight, capacity = self._top2(prob, mask1, first, second, cf)
        load = None
        if self.balance_bias is not None:
            flat = expert.reshape(-1)
            load = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
            load = load.index_add_(0, flat, torch.ones_like(flat))
        return Routing(expert, kept, slot, weight, prob, capacity, balance, z_loss, load)

    def selection_bias(self, layer: int = 0) -> Tensor | None:
        """[E] fp32 bias layer ``layer`` adds to its probabilities to choose experts, or None."""
        if self.balance_bias is None:
            return None
        return self.balance_bias[layer if self.balance_bias.shape[0] > 1 else 0]

    def _top1(self, prob, mask1, first, cf):
        n, num_experts = prob.shape
        counts = mask1.sum(0)
        if self.drop_tokens:
            capacity = max(math.ceil(n / num_experts * cf), self.min_capacity)
        else:
            capacity = int(counts.max()) if n else 0
        if capacity < n:
            # DeepSpeed's selection: per expert, the top `capacity` frames by priority (a random
            # priority with RTS, else torch.topk's order among ties).
            priority = mask1 * torch.rand_like(prob) if self.use_rts and self.training else mask1
            top = torch.topk(priority, k=capacity, dim=0)[1]
            mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top, 1)
        kept = mask1.sum(1).bool()
        slot = ((torch.cumsum(mask1, dim=0) - 1) * mask1).sum(1)
        weight = prob.gather(1, first[:, None]).squeeze(1) * kept
        return first[:, None], kept[:, None], slot[:, None], weight[:, None], capacity

    def _top2(self, prob, mask1, first, second, cf):
        n, num_experts = prob.shape
        mask2 = F.one_hot(second, num_experts)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        # Second choices queue behind every first choice of the same expert.
        loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(0, keepdim=True)
        if self.drop_tokens:
            capacity = max(math.ceil(n / num_experts * cf * 2), self.min_capacity)
            mask1 = mask1 * (loc1 < capacity)
            mask2 = mask2 * (loc2 < capacity)
        else:
            capacity = int((mask1 + mask2).sum(0).max()) if n else 0
        g1 = (prob * mask1).sum(1)
        g2 = (prob * mask2).sum(1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(prob.dtype).eps)
        expert = torch.stack([first, second], dim=1)
        kept = torch.stack([mask1.sum(1), mask2.sum(1)], dim=1).bool()
        slot = torch.stack([(loc1 * mask1).sum(1), (loc2 * mask2).sum(1)], dim=1)
        weight = torch.stack([g1 / denom, g2 / denom], dim=1)
        return expert, kept, slot, weight, capacity

    def forward(self, input, used_token=None, sparse_routes=True, use_tutel=False):
        """DeepSpeed's gate interface, as ``MOELayer.forward`` calls it.

        ``MOELayer`` hands its second input to the gate unchanged: :class:`~omni_ds.model.moe.MoEFeedForward`
        passes a precomputed :class:`Routing` that way (routing runs once per layer, whichever
        dispatch runs); a tensor is DeepSpeed's ``used_token`` mask (1 = real frame).
        """
        if not sparse_routes or use_tutel:
            raise NotImplementedError("Router serves DeepSpeed's sparse-route dispatch only")
        if isinstance(used_token, Routing):
            return used_token.deepspeed_routes(used_token.capacity)
        real = None if used_token is None else used_token.reshape(-1).bool()
        routing = self.route(input if real is None else input[real])
        if real is not None:
            routing = scatter_routing(routing, real)
        return routing.deepspeed_routes(routing.capacity)


def scatter_routing(routing: Routing, real: Tensor) -> Routing:
    """Spread a routing of the real frames over all frames; pads get dropped, zero-weight routes."""

    def spread(t: Tensor, fill) -> Tensor:
        out = torch.full((real.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        return out.index_put((real,), t)

    return dataclasses.replace(
        routing,
        expert=spread(routing.expert, 0),
        kept=spread(routing.kept, False),
        slot=spread(routing.slot, 0),
        weight=spread(routing.weight, 0.0),
        prob=spread(routing.prob, 0.0),
    )
