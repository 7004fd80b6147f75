"""The ``model:`` section: the encoder's shape, its front end and its Mixture-of-Experts.

Plain typed dataclasses (one per component, a docstring under every field, checks in
``__post_init__``); ``omni_ds.model`` builds the encoder from them. Follow ``num_experts`` from
here to :class:`omni_ds.model.moe.MoEFeedForward`, which hands it to DeepSpeed's ``MoE``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from omni_ds.errors import ConfigError

MAX_MELS = 200
"""Mel bins a 25 ms window at 16 kHz (a 400-point FFT) can resolve: n_fft // 2."""


@dataclasses.dataclass(kw_only=True)
class SpecAugmentConfig:
    """SpecAugment (Park et al. 2019) on normalised log-mel frames; applied in training only."""

    freq_masks: int = 2
    """Frequency masks per utterance."""
    freq_width: int = 27
    """Maximum width of a frequency mask, in mel bins (width drawn uniformly from 0..this)."""
    time_masks: int = 10
    """Time masks per utterance."""
    time_width: int = 40
    """Maximum width of a time mask, in 10 ms frames."""
    time_width_ratio: float = 0.05
    """A time mask is also at most this fraction of the utterance's frames (short utterances)."""

    def __post_init__(self) -> None:
        for key in ("freq_masks", "freq_width", "time_masks", "time_width"):
            if getattr(self, key) < 0:
                raise ConfigError(f"specaug.{key}: {getattr(self, key)} < 0; use 0 to disable")
        if not 0.0 <= self.time_width_ratio <= 1.0:
            raise ConfigError(
                f"specaug.time_width_ratio: {self.time_width_ratio} is outside [0, 1]; "
                "use e.g. 0.05"
            )


@dataclasses.dataclass(kw_only=True)
class FrontendConfig:
    """Feature extraction and subsampling to the encoder's frame rate."""

    n_mels: int = 80
    """Mel bins of the log-mel features (25 ms Hann window, 10 ms hop, 0–8 kHz, Slaney mel)."""
    normalize: Literal["utterance", "none"] = "utterance"
    """``utterance``: zero mean, unit variance per mel bin over the utterance's valid frames."""
    subsampling: Literal["stack", "conv"] = "stack"
    """``stack``: concatenate 4 frames + linear projection (the paper's models); ``conv``: two
    stride-2 3x3 convolutions + linear projection. Both give 40 ms frames."""
    conv_channels: int = 256
    """Channels of the ``conv`` subsampler."""
    specaug: SpecAugmentConfig = dataclasses.field(default_factory=SpecAugmentConfig)
    """SpecAugment masks (training only)."""

    def __post_init__(self) -> None:
        if self.n_mels < 1 or self.n_mels > MAX_MELS:
            raise ConfigError(f"frontend.n_mels: {self.n_mels} is outside 1..200; use 80")
        if self.conv_channels < 1:
            raise ConfigError(f"frontend.conv_channels: {self.conv_channels} < 1; use e.g. 256")


@dataclasses.dataclass(kw_only=True)
class MoEConfig:
    """How the feed-forward layers are made sparse and routed."""

    router: Literal["dense", "switch", "omni"] = "omni"
    """``dense``: plain FFN; ``switch``: one router per MoE layer; ``omni``: one router shared by all."""
    num_experts: int = 8
    """Experts per MoE layer (every MoE layer has the same number)."""
    top_k: int = 1
    """Experts per frame: 1 (Switch) or 2 (GShard; the two weights are renormalised to sum to 1)."""
    capacity_factor: float = 1.25
    """Training capacity per expert = ceil(k * frames / E * factor) (at least ``min_capacity``)."""
    eval_capacity_factor: float = 2.0
    """Capacity factor in eval mode."""
    dropless: bool = False
    """Never drop a frame: each expert takes every frame routed to it."""
    min_capacity: int = 4
    """Lower bound on the per-expert capacity when dropping."""
    balance_loss_weight: float = 0.01
    """Weight of the summed per-layer load-balancing losses in the total loss."""
    z_loss_weight: float = 0.0
    """Weight of the summed per-layer router z-losses in the total loss."""
    jitter: float = 0.0
    """Multiplicative jitter: router inputs scaled by U(1-jitter, 1+jitter) in training; 0 = off."""
    ep_size: int = 1
    """Expert-parallel group size: each rank holds num_experts / ep_size experts of every layer."""
    dispatch: Literal["grouped", "stock"] = "grouped"
    """``grouped``: exact per-expert counts; ``stock``: DeepSpeed's dense capacity buffer."""
    expert_kernel: Literal["auto", "loop", "grouped_mm"] = "auto"
    """How ``grouped`` dispatch runs the experts: ``loop`` (one GEMM per expert), ``grouped_mm``
    (``torch._grouped_mm``, one GEMM for all; d_model and d_ff multiples of 8) or ``auto``: the
    loop on CPUs (measured faster there), the grouped GEMM for bf16 on CUDA GPUs of compute
    capability 9.0+ where this torch runs it (``omni_ds.model.dispatch`` says why)."""
    router_bias: bool = False
    """Give the router a bias (E values) besides its E x d weight."""
    use_rts: bool = False
    """Random token selection when dropping (training only): drop random frames, not late ones."""
    second_expert_sampling: bool = False
    """Top-2 only: sample the 2nd expert with Gumbel noise on the logits (training only)."""
    router_groups: int | str = 1
    """``router: omni`` only: the MoE layers in consecutive groups, one router per group. An
    integer G dividing the number of MoE layers L (1 = one router for all, the Omni-router; L =
    one per layer, Switch's routing), or the released Omni-router configs' grammar, one
    ``AxE`` per group of A layers with E experts, joined by ``-`` (every A equal, every E =
    num_experts): ``"4x4-4x4-4x4-4x4"`` = 16 MoE layers as 4 groups of 4 with 4 experts."""
    expert_bias: bool = False
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router
    probabilities to *choose* the experts (combine weights stay unbiased), moved after every
    optimizer step by ``expert_bias_rate`` towards the mean load; no gradient. Combine with the
    balance loss or replace it (``balance_loss_weight: 0``)."""
    expert_bias_rate: float = 1e-3
    """Step of the bias update: bias_i += rate * sign(mean load - load_i), recentred to mean 0."""
    expert_bias_per_layer: bool = False
    """A router shared by several layers keeps one bias per layer (balanced on that layer's own
    load) instead of one bias for the router (balanced on the load summed over its layers)."""

    def __post_init__(self):
        def bad(key, fix):
            raise ConfigError(f"model.moe.{key} = {getattr(self, key)!r}: {fix}")

        if self.router not in ("dense", "switch", "omni"):
            bad("router", "use dense, switch or omni")
        if self.dispatch not in ("grouped", "stock"):
            bad("dispatch", "use grouped or stock")
        if self.expert_kernel not in ("auto", "loop", "grouped_mm"):
            bad("expert_kernel", "use auto, loop or grouped_mm")
        if self.dispatch == "stock" and self.expert_kernel != "auto":
            bad("expert_kernel", "applies to dispatch: grouped only; drop it or use grouped")
        if self.num_experts < 1:
            bad("num_experts", "use at least 1")
        if self.top_k not in (1, 2):
            bad("top_k", "use 1 or 2")
        if self.top_k > self.num_experts:
            bad("top_k", f"use at most num_experts ({self.num_experts})")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            bad("ep_size", f"use a divisor of num_experts ({self.num_experts})")
        for key in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, key) <= 0:
                bad(key, "use a positive factor (or dropless: true)")
        for key in ("min_capacity", "balance_loss_weight", "z_loss_weight"):
            if getattr(self, key) < 0:
                bad(key, "use a value >= 0")
        if not 0 <= self.jitter < 1:
            bad("jitter", "use a value in [0, 1)")
        if self.expert_bias_rate < 0:
            bad("expert_bias_rate", "use a value >= 0 (e.g. 1e-3)")
        if self.expert_bias and self.router == "dense":
            bad("expert_bias", "a dense model has no router to bias; use router: switch or omni")
        if self.expert_bias and self.second_expert_sampling:
            bad("expert_bias", "it and second_expert_sampling both pick the 2nd expert; use one")
        self._parse_groups()

    def _parse_groups(self) -> tuple[int, int | None]:
        """``(groups, layers per group)`` of ``router_groups``; layers None for an integer G."""
        groups = self.router_groups
        if groups != 1 and self.router != "omni":
            raise ConfigError(
                f"model.moe.router_groups = {groups!r} needs router: omni (switch always has one "
                "router per MoE layer, dense none); set router: omni"
            )
        if isinstance(groups, int):
            if groups < 1:
                raise ConfigError(f"model.moe.router_groups = {groups}: use at least 1")
            return groups, None
        sizes = []
        for part in groups.split("-"):
            layers, x, experts = part.partition("x")
            if not (x and layers.isdigit() and experts.isdigit() and int(layers) > 0):
                raise ConfigError(
                    f"model.moe.router_groups = {groups!r}: {part!r} is not LAYERSxEXPERTS; "
                    'write e.g. "4x4-4x4-4x4-4x4", or an integer number of groups'
                )
            if int(experts) != self.num_experts:
                raise ConfigError(
                    f"model.moe.router_groups = {groups!r}: {part!r} gives {experts} experts, but "
                    f"every MoE layer has num_experts = {self.num_experts}; write "
                    f"{layers}x{self.num_experts}"
                )
            sizes.append(int(layers))
        if len(set(sizes)) > 1:
            raise ConfigError(
                f"model.moe.router_groups = {groups!r}: groups of {sizes} MoE layers are uneven; "
                f"use groups of one size, e.g. router_groups: {len(sizes)}"
            )
        return len(sizes), sizes[0]

    def group_sizes(self, moe_layers: int) -> list[int]:
        """MoE layers of each router, in layer order, for a model with ``moe_layers`` of them:
        dense ``[]``, switch ``[1] * L``, omni ``router_groups`` equal groups."""
        if self.router == "dense":
            return []
        if self.router == "switch":
            return [1] * moe_layers
        groups, size = self._parse_groups()
        if size is not None and groups * size != moe_layers:
            raise ConfigError(
                f"model.moe.router_groups = {self.router_groups!r} covers {groups * size} MoE "
                f"layers, the model has {moe_layers}; make the groups add up to {moe_layers}, or "
                "give the number of groups as an integer"
            )
        if moe_layers % groups:
            divisors = [d for d in range(1, moe_layers + 1) if moe_layers % d == 0]
            raise ConfigError(
                f"model.moe.router_groups = {self.router_groups!r}: {groups} groups do not split "
                f"the {moe_layers} MoE layers evenly; use one of {divisors}"
            )
        return [moe_layers // groups] * groups


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """Shape of the encoder; ``moe`` picks the router mode and the experts."""

    vocab_size: int = 256
    """SentencePiece vocabulary size V; the CTC head has V+1 outputs, blank = V."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 6
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (d_model must be divisible by it)."""
    d_ff: int = 1024
    """Hidden width of each FFN and of each expert."""
    dropout: float = 0.1
    """Dropout on attention weights, the attention output and inside the FFNs/experts."""
    moe_every: int = 1
    """1: every block's FFN is MoE; 2: every second block's (blocks 1, 3, 5, ...)."""
    position: Literal["sinusoidal", "cape"] = "cape"
    """``sinusoidal`` absolute positions, or CAPE: sinusoids of positions centred on each
    utterance's middle and, in training, randomly shifted and scaled (Likhomanenko et al. 2021)."""
    cape_global_shift: float = 30.0
    """CAPE: each utterance's positions shift by U(-this, this) frames in training."""
    cape_local_shift: float = 0.5
    """CAPE: each position shifts by U(-this, this) frames in training (≤ 0.5 keeps the order)."""
    cape_global_scaling: float = 1.1
    """CAPE: positions scale by exp(U(-ln this, ln this)) per utterance in training (1 = off)."""
    frontend: FrontendConfig = dataclasses.field(default_factory=FrontendConfig)
    """Log-mel features, normalisation, SpecAugment and subsampling."""
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    """Router mode, experts, capacity and auxiliary-loss weights."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}: {getattr(self, key)} must be at least 1")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.n_heads: d_model {self.d_model} / n_heads {self.n_heads} must be an even "
                "integer; pick n_heads so that d_model = n_heads × an even head size"
            )
        if self.moe.expert_kernel == "grouped_mm" and (self.d_model % 8 or self.d_ff % 8):
            raise ConfigError(
                f"model.moe.expert_kernel = 'grouped_mm' needs d_model ({self.d_model}) and "
                f"d_ff ({self.d_ff}) to be multiples of 8 (16-byte rows); use expert_kernel: auto"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: {self.dropout} is outside [0, 1); use e.g. 0.1")
        if self.moe_every not in (1, 2):
            raise ConfigError(f"model.moe_every: {self.moe_every} is not allowed; use 1 or 2")
        if self.moe.router != "dense" and self.n_layers < self.moe_every:
            raise ConfigError(
                f"model.n_layers: {self.n_layers} block with moe_every {self.moe_every} has no "
                "MoE layer; add layers, set moe_every: 1, or use router: dense"
            )
        if not 0.0 <= self.cape_local_shift <= 0.5:
            raise ConfigError(
                f"model.cape_local_shift: {self.cape_local_shift} is outside [0, 0.5]; larger "
                "shifts can swap neighbouring frames"
            )
        if self.cape_global_shift < 0 or self.cape_global_scaling < 1.0:
            raise ConfigError(
                "model.cape_global_shift must be ≥ 0 and model.cape_global_scaling ≥ 1, got "
                f"{self.cape_global_shift} and {self.cape_global_scaling}"
            )
        self.moe.group_sizes(self.moe_layers)  # router_groups must split the MoE layers

    @property
    def moe_layers(self) -> int:
        """Number of MoE layers."""
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def is_moe_layer(self, index: int) -> bool:
        return self.moe.router != "dense" and (index + 1) % self.moe_every == 0
