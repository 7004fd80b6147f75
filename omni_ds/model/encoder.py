"""The CTC speech encoder: front end → pre-LN Transformer with (shared-router) MoE FFNs → CTC head.

    audio [B,S] ─Frontend─▶ x [B,T,D] (40 ms frames) + positions (sinusoidal or CAPE)
      └▶ n_layers × Block:  x += Attn(LN(x))              (SDPA, padded keys masked)
                            x += FFN(LN(x))               (dense, or MoE on every moe_every-th layer)
      └▶ LN ─▶ Linear ─▶ logits [B,T,V+1]                 (CTC blank = index V, the last)

Router modes (``model.moe.router``): ``dense`` (plain FFN everywhere), ``switch`` (each MoE layer
routes with its own :class:`~omni_ds.model.router.Router`), ``omni`` (one Router, ``self.router``,
registered before the blocks so its canonical parameter name is ``router.*``, shared by every MoE
layer; each layer applies it to its own normalised hidden state); ``router_groups: G`` gives omni
G routers (``self.routers``), each shared by L/G consecutive MoE layers. The encoder makes the
routers and hands each MoE block its own (a required argument). MoE layers are blocks ``moe_every-1, 2*moe_every-1, ...``.

Loss (:meth:`SpeechEncoder.loss`): CTC in fp32, **normalised per target token**: the summed
negative log-likelihood of the batch divided by the number of target tokens in the batch (so a
value is nats per token, comparable across batch sizes and utterance lengths); infeasible
utterances (fewer frames than CTC needs) contribute 0 (``zero_infinity``). Plus
``balance_loss_weight × Σ_layers balance`` and ``z_loss_weight × Σ_layers z``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omni_ds.config.model import ModelConfig
from omni_ds.model.frontend import Frontend, valid_mask
from omni_ds.model.moe import FeedForward, MoEFeedForward, RoutingStats
from omni_ds.model.router import Router


class EncoderOutput(NamedTuple):
    logits: torch.Tensor
    """[B, T, V+1] in the model's compute dtype; blank = V."""
    out_lens: torch.Tensor
    """[B] valid 40 ms frames per utterance."""
    balance_loss: torch.Tensor
    """Scalar: unweighted balance losses summed over MoE layers (0 for dense)."""
    z_loss: torch.Tensor
    """Scalar: unweighted router z-losses summed over MoE layers (0 for dense)."""
    routing: list[RoutingStats] | None
    """One entry per MoE layer with ``return_stats=True``, else None."""
    load: torch.Tensor | None = None
    """[MoE layers, E] int64 routes per expert with ``expert_bias`` (for its update), else None."""


class LossOutput(NamedTuple):
    total: torch.Tensor
    """ctc + balance_loss_weight × balance + z_loss_weight × z (fp32)."""
    ctc: torch.Tensor
    """CTC negative log-likelihood per target token (fp32)."""
    balance: torch.Tensor
    """Unweighted balance loss summed over MoE layers."""
    z: torch.Tensor
    """Unweighted z-loss summed over MoE layers."""


def sinusoids(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``pos [B,T]`` (float, any scale) → ``[B,T,dim]``: sin and cos at geometric frequencies."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) * (-math.log(1e4) / dim)
    )
    angle = pos.float()[..., None] * inv_freq
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def positions(cfg: ModelConfig, lens: torch.Tensor, length: int, training: bool) -> torch.Tensor:
    """Frame positions ``[B, length]`` for the positional embedding (see ``ModelConfig.position``)."""
    pos = torch.arange(length, device=lens.device, dtype=torch.float32).expand(len(lens), -1)
    if cfg.position == "sinusoidal":
        return pos
    # CAPE: centring on each utterance's own middle keeps an utterance's positions independent
    # of the padding around it, so train and test see the same range.
    pos = pos - (lens.clamp_min(1).float()[:, None] - 1) / 2
    if training:
        b = len(lens)
        shift = (torch.rand(b, 1, device=pos.device) * 2 - 1) * cfg.cape_global_shift
        local = (torch.rand_like(pos) * 2 - 1) * cfg.cape_local_shift
        log_scale = (torch.rand(b, 1, device=pos.device) * 2 - 1) * math.log(
            cfg.cape_global_scaling
        )
        pos = (pos + shift + local) * log_scale.exp()
    return pos


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x [B,T,D]``, ``keep [B,1,1,T]`` bool (True = a key that may be attended to)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN Transformer block whose FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, router: Router | None, router_layer: int = 0) -> None:
        super().__init__()
        self.is_moe = moe = router is not None
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        if moe:
            self.ffn: nn.Module = MoEFeedForward(
                cfg.moe, cfg.d_model, cfg.d_ff, router=router, router_layer=router_layer,
                dropout=cfg.dropout,
            )  # fmt: skip
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(self, x, keep, pad_mask, return_stats):
        x = x + self.drop(self.attn(self.ln_attn(x), keep))
        h = self.ln_ffn(x)
        if not self.is_moe:
            return x + self.drop(self.ffn(h)), None
        moe = self.ffn(h, pad_mask, return_stats=return_stats)
        return x + self.drop(moe.out), moe


class SpeechEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.frontend = Frontend(cfg.frontend, cfg.d_model)
        # The one place routers are made, all before the blocks (the order of their random
        # draws): omni shares one per group of consecutive MoE layers (registered before the
        # blocks, so their canonical names are ``router.*``, or ``routers.<g>.*`` for several
        # groups), switch gives every MoE layer its own.
        sizes = cfg.moe.group_sizes(cfg.moe_layers)
        omni = cfg.moe.router == "omni"
        made = [Router(cfg.moe, cfg.d_model, layers=n if omni else 1) for n in sizes]
        self.router = made[0] if omni and len(made) == 1 else None
        if omni and len(made) > 1:
            self.routers = nn.ModuleList(made)
        slots = iter([(router, j) for router, n in zip(made, sizes) for j in range(n)])
        self.blocks = nn.ModuleList(
            Block(cfg, *next(slots)) if cfg.is_moe_layer(i) else Block(cfg, None)
            for i in range(cfg.n_layers)
        )
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size + 1)

    @property
    def blank(self) -> int:
        return self.cfg.vocab_size

    def forward(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, *, return_stats: bool = False
    ) -> EncoderOutput:
        """``audio [B,S]`` float 16 kHz zero-padded, ``audio_lens [B]`` samples."""
        x, lens = self.frontend(audio, audio_lens)
        t = x.shape[1]
        pos = positions(self.cfg, lens, t, self.training)
        x = x + sinusoids(pos, self.cfg.d_model).to(x.dtype)
        pad_mask = ~valid_mask(lens, t)
        # An utterance too short for one frame still gets one key, so no softmax row is empty.
        keep = valid_mask(lens.clamp_min(1), t)[:, None, None, :]
        zero = x.new_zeros((), dtype=torch.float32)
        balance, z_loss, routing = zero, zero, [] if return_stats else None
        loads = []
        for block in self.blocks:
            x, moe = block(x, keep, pad_mask, return_stats)
            if moe is not None:
                balance = balance + moe.balance_loss.float()
                z_loss = z_loss + moe.z_loss.float()
                if return_stats:
                    routing.append(moe.stats)
                if moe.load is not None:
                    loads.append(moe.load)
        logits = self.head(self.ln_out(x))
        load = torch.stack(loads) if loads else None
        return EncoderOutput(logits, lens, balance, z_loss, routing, load)

    def loss(
        self, out: EncoderOutput, tokens: torch.Tensor, token_lens: torch.Tensor
    ) -> LossOutput:
        """CTC per target token in fp32 plus the weighted auxiliary losses (module docstring)."""
        with torch.autocast(device_type=out.logits.device.type, enabled=False):
            log_probs = out.logits.float().log_softmax(-1).transpose(0, 1)  # [T, B, V+1]
            nll = F.ctc_loss(
                log_probs,
                tokens,
                out.out_lens,
                token_lens,
                blank=self.blank,
                reduction="sum",
                zero_infinity=True,
            )
            ctc = nll / token_lens.sum().clamp_min(1)
            moe = self.cfg.moe
            total = (
                ctc + moe.balance_loss_weight * out.balance_loss + moe.z_loss_weight * out.z_loss
            )
        return LossOutput(total, ctc, out.balance_loss, out.z_loss)

    def parameter_counts(self) -> tuple[int, int]:
        """``(total, active)`` parameters of this process's copy of the model; active = what one
        frame uses (every dense weight, the router, and top_k of the E experts in each MoE layer),
        i.e. the dense-equivalent size. With ``ep_size > 1`` only the local experts are counted."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for block in self.blocks:
            if block.is_moe:
                experts = sum(p.numel() for p in block.ffn.parameters() if _is_expert(p))
                local = self.cfg.moe.num_experts // self.cfg.moe.ep_size
                inactive += experts - experts // local * self.cfg.moe.top_k
        return total, total - inactive


def _is_expert(p: torch.Tensor) -> bool:
    # DeepSpeed marks expert weights as not all-reduced over data parallel ranks.
    return getattr(p, "allreduce", True) is False


def build_model(cfg: ModelConfig) -> SpeechEncoder:
    """The encoder for ``cfg``; build it under ``torch.device("meta")`` to size it for free."""
    return SpeechEncoder(cfg)
