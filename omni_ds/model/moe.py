"""The MoE feed-forward block: DeepSpeed's expert-parallel ``MoE`` routed by a :class:`Router`.

    router = Router(cfg, d_model)                            # the encoder makes it (omni: once)
    ffn = MoEFeedForward(cfg, d_model, d_ff, router=router)  # one per MoE layer
    res = ffn(layer_norm(h), pad_mask)                       # MoEOutput(out, balance_loss, z_loss, stats)

Each block is a stock ``deepspeed.moe.layer.MoE`` (so expert-parallel groups, expert parameter
marking, the expert checkpoint files and the optimizer's MoE param groups are DeepSpeed's) whose gate
is replaced by the router: the shared one for ``omni`` (one per group of layers with
``router_groups``), a fresh one per layer for ``switch``.

Padding: only real frames are routed; pad positions of ``out`` are zero.

Dispatch (``dispatch``): ``stock`` runs DeepSpeed's ``MOELayer.forward`` (a dense
[experts, capacity, d] buffer, whose capacity in dropless mode is the busiest expert's count, so
cost grows with routing skew); ``grouped`` (default) sorts the routed frames by expert and runs
each expert on exactly its own frames, and with ``ep_size > 1`` exchanges exactly those rows by
all-to-all with split sizes (:mod:`omni_ds.model.dispatch`). Both apply the same routing and give the
same outputs.

Losses: each block returns its *unweighted* balance loss E * sum_i f_i * P_i (f_i: fraction of
this rank's real frames whose first choice is expert i, before capacity drops; P_i: mean router
probability of i over the same frames) and its unweighted z-loss (mean over real frames of
logsumexp(logits)^2). The model sums them over MoE layers (a plain sum, no averaging over layers)
and multiplies the sums by ``balance_loss_weight`` and ``z_loss_weight``:
``total = ctc + balance_loss_weight * sum_l balance_l + z_loss_weight * sum_l z_l``.
Under data parallelism each rank's loss covers its own frames and DeepSpeed averages gradients.

Activation checkpointing: use ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.
Reentrant checkpointing (also ``deepspeed.checkpointing``) makes every layer's backward fire the
shared router's gradient hook, and ZeRO-2 stops with "router.wg.weight has already been reduced"
(DeepSpeed issue 2103, open in 0.19.8; ``tests/test_moe_zero.py`` pins both behaviours).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from omni_ds import dist
from omni_ds.config.model import MoEConfig
from omni_ds.errors import ConfigError
from omni_ds.model.dispatch import grouped_dispatch
from omni_ds.model.router import Router, Routing, gating_kwargs


@dataclasses.dataclass
class RoutingStats:
    """One MoE layer's routing of the real frames, row-major (batch, time) order."""

    expert: Tensor
    """[N_real, k] int64: chosen experts (before capacity drops)."""
    prob: Tensor
    """[N_real, k] fp32: router probability of each chosen expert."""
    usage: Tensor
    """[E]: fraction of the routes (N_real * k) that chose each expert; sums to 1."""
    entropy: Tensor
    """Scalar: mean over real frames of the router distribution's entropy (nats)."""


class MoEOutput(NamedTuple):
    out: Tensor
    """[B, T, D]; zero at pad positions."""
    balance_loss: Tensor
    """Unweighted E * sum_i f_i * P_i of this layer."""
    z_loss: Tensor
    """Unweighted router z-loss of this layer."""
    stats: RoutingStats | None
    load: Tensor | None = None
    """[E] int64 routes per expert (``expert_bias`` only), for the bias update."""


class FeedForward(nn.Module):
    """The dense FFN, and the expert of every MoE layer: Linear, GELU, dropout, Linear."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class MoEFeedForward(nn.Module):
    """A DeepSpeed ``MoE`` block routed by ``router`` (omni) or by its own router (switch)."""

    def __init__(
        self,
        cfg: MoEConfig,
        d_model: int,
        d_ff: int,
        *,
        router: Router,
        router_layer: int = 0,
        dropout: float = 0.0,
    ):
        """``router_layer``: this block's index among the layers sharing ``router``."""
        super().__init__()
        if cfg.router == "dense":
            raise ConfigError("moe.router = 'dense': build a FeedForward instead of an MoE block")
        self.cfg = cfg
        self.router_layer = router_layer
        self.random_routing = False
        """Eval-only ablation: each frame's experts are replaced by uniformly random ones."""
        self.moe = MoE(
            d_model,
            FeedForward(d_model, d_ff, dropout),
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            **gating_kwargs(cfg),
        )
        # The stock per-layer TopKGate is replaced, not kept beside the router: one W_r.
        self.moe.deepspeed_moe.gate = router
        self._init_experts()

    def _init_experts(self) -> None:
        # DeepSpeed deep-copies one expert module, so all experts would start identical. Each
        # global expert gets its own init from a seed of (one draw per layer, global id): the
        # same weights whatever ep_size, as DeepSpeed puts consecutive ranks in one ep group.
        base = int(torch.randint(2**31, (), device="cpu"))  # also under a meta-device context
        ep_rank = dist.rank() % self.cfg.ep_size
        for j, expert in enumerate(self.experts):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base + ep_rank * len(self.experts) + j)
                for module in expert.modules():
                    if isinstance(module, nn.Linear):
                        module.reset_parameters()

    @property
    def router(self) -> Router:
        return self.moe.deepspeed_moe.gate

    @property
    def experts(self) -> nn.ModuleList:
        """This rank's experts, global ids ep_rank * len + i."""
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(
        self, x: Tensor, pad_mask: Tensor | None = None, *, return_stats: bool = False
    ) -> MoEOutput:
        """``x`` [B, T, D] (already layer-normed), ``pad_mask`` [B, T] True at pads."""
        if self.random_routing and self.training:
            raise RuntimeError("random_routing is an eval-only ablation; call .eval() first")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        real = None if pad_mask is None else ~pad_mask.reshape(-1)
        tokens = flat if real is None else flat[real]
        routing = self.router.route(
            tokens, layer=self.router_layer, random_experts=self.random_routing
        )
        ep_group = self.moe.deepspeed_moe.ep_group
        if self.cfg.ep_size > 1 and ep_group is None:
            raise RuntimeError(
                "ep_size > 1 needs DeepSpeed's expert-parallel group: wrap the model with "
                "deepspeed.initialize, or call set_deepspeed_parallelism() on each MoE"
            )
        if self.cfg.dispatch == "grouped":
            out = grouped_dispatch(tokens, routing, self.experts, ep_group, self.cfg.ep_size,
                                   self.cfg.expert_kernel)  # fmt: skip
        else:
            out = self._stock_dispatch(tokens, routing, ep_group)
        if real is not None:
            out = flat.new_zeros(flat.shape).index_put((real,), out)
        stats = _stats(routing) if return_stats else None
        return MoEOutput(
            out.reshape(shape), routing.balance_loss, routing.z_loss, stats, routing.load
        )

    def _stock_dispatch(self, tokens: Tensor, routing: Routing, ep_group) -> Tensor:
        # All ranks of an expert-parallel group exchange equal [E, C, d] buffers, so C is the
        # largest capacity in the group (ranks hold different numbers of real frames).
        capacity = torch.tensor(max(routing.capacity, 1), device=tokens.device)  # NCCL: on GPU
        if self.cfg.ep_size > 1:
            torch.distributed.all_reduce(capacity, torch.distributed.ReduceOp.MAX, group=ep_group)
        routing = dataclasses.replace(routing, capacity=int(capacity))
        return self.moe.deepspeed_moe(tokens, routing)


@torch.no_grad()
def _stats(routing: Routing) -> RoutingStats:
    n, num_experts = routing.prob.shape
    counts = torch.bincount(routing.expert.reshape(-1), minlength=num_experts)
    entropy = -(routing.prob * routing.prob.clamp_min(1e-12).log()).sum(-1)
    return RoutingStats(
        expert=routing.expert,
        prob=routing.prob.gather(1, routing.expert),
        usage=counts.float() / max(routing.expert.numel(), 1),
        entropy=entropy.mean() if n else entropy.new_zeros(()),
    )
