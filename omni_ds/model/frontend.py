"""Waveform to encoder input frames, on the model's device: log-mel, normalisation, SpecAugment, subsampling.

    audio [B,S] 16 kHz ──log_mel──▶ [B,T,80] (25 ms window, 10 ms hop) ──normalise──▶ SpecAugment
    (training only) ──subsample ×4──▶ [B,T/4,d_model] (40 ms frames)

Every step looks only at an utterance's own samples and frames (no centre padding, statistics over
valid frames, subsampling that never mixes in frames past the end), so an utterance gives the same
frames alone and zero-padded in a batch. Features are always computed in fp32, whatever the model's
dtype or autocast, because the STFT and the log need the range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.audio import SAMPLE_RATE
from omni_ds.config.model import FrontendConfig, SpecAugmentConfig

WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_FFT = 400  # config.model.MAX_MELS is N_FFT // 2
LOG_FLOOR = 1e-6  # about -80 dB for a full-scale sine; keeps digital silence finite


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    lin = f / (200.0 / 3)
    log = 15.0 + torch.log(f.clamp_min(1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    lin = m * (200.0 / 3)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0))
    return torch.where(m >= 15.0, log, lin)


def mel_filterbank(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """Triangular Slaney-normalised mel filters ``[n_mels, n_fft//2+1]`` from 0 Hz to Nyquist."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = torch.linspace(0.0, 1.0, n_mels + 2, dtype=torch.float64)
    top = _hz_to_mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    mel_hz = _mel_to_hz(edges * top)
    widths = mel_hz.diff()
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.minimum(lower, upper).clamp_min(0.0)
    # Slaney area normalisation: each filter integrates to the same energy.
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.float()


def num_frames(audio_lens: torch.Tensor) -> torch.Tensor:
    """10 ms frames that lie wholly inside each utterance (no centre padding)."""
    return torch.div(audio_lens - WIN_LENGTH, HOP_LENGTH, rounding_mode="floor").add(1).clamp_min(0)


def valid_mask(lens: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]`` bool, True on each row's first ``lens[b]`` positions."""
    return torch.arange(length, device=lens.device)[None, :] < lens[:, None]


class LogMel(nn.Module):
    """``audio [B,S]`` → ``(log-mel [B,T,n_mels] fp32, frame_lens [B])``; frames past a row's
    length are zero. The window and filters are rebuilt per device in fp32, not kept as buffers, so
    casting the model to bf16/fp16 cannot round them."""

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        self.n_mels = n_mels
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            window = torch.hann_window(WIN_LENGTH, periodic=True, device=device)
            self._consts[device] = (window, mel_filterbank(self.n_mels).to(device))
        return self._consts[device]

    def forward(
        self, audio: torch.Tensor, audio_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        window, fbank = self._constants(audio.device)
        with torch.autocast(device_type=audio.device.type, enabled=False):
            audio = audio.float()
            if audio.shape[1] < WIN_LENGTH:
                audio = F.pad(audio, (0, WIN_LENGTH - audio.shape[1]))
            spec = torch.stft(
                audio,
                N_FFT,
                hop_length=HOP_LENGTH,
                win_length=WIN_LENGTH,
                window=window,
                center=False,
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()  # [B, F, T]
            feats = torch.log(torch.matmul(fbank, power) + LOG_FLOOR).transpose(1, 2)
        lens = num_frames(audio_lens).clamp_max(feats.shape[1])
        return feats * valid_mask(lens, feats.shape[1])[..., None], lens


def normalize_utterance(feats: torch.Tensor, lens: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per feature over each utterance's valid frames; padding stays 0."""
    mask = valid_mask(lens, feats.shape[1])[..., None].to(feats.dtype)
    count = lens.clamp_min(1).to(feats.dtype)[:, None, None]
    mean = (feats * mask).sum(1, keepdim=True) / count
    var = ((feats - mean).square() * mask).sum(1, keepdim=True) / count
    return (feats - mean) * torch.rsqrt(var + eps) * mask


def _mask_spans(
    n: int, rows: int, max_width: torch.Tensor, limit: torch.Tensor, size: int, device: torch.device
) -> torch.Tensor:
    """``[rows, size]`` bool: the union of ``n`` random spans per row, each of width uniform in
    ``0..max_width[row]`` and placed inside ``0..limit[row]``."""
    if n == 0:
        return torch.zeros(rows, size, dtype=torch.bool, device=device)
    u = torch.rand(2, rows, n, device=device)
    width = (u[0] * (max_width[:, None] + 1).float()).floor().long()
    width = torch.minimum(width, limit[:, None])
    start = (u[1] * (limit[:, None] - width + 1).float()).floor().long()
    pos = torch.arange(size, device=device)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return inside.any(dim=1)


def spec_augment(feats: torch.Tensor, lens: torch.Tensor, cfg: SpecAugmentConfig) -> torch.Tensor:
    """Zero random frequency bands and time spans (0 is the mean after normalisation)."""
    b, t, f = feats.shape
    dev = feats.device
    freq = _mask_spans(
        cfg.freq_masks,
        b,
        torch.full((b,), cfg.freq_width, device=dev),
        torch.full((b,), f, device=dev),
        f,
        dev,
    )
    max_t = torch.minimum(
        torch.full_like(lens, cfg.time_width), (lens.float() * cfg.time_width_ratio).long()
    )
    time = _mask_spans(cfg.time_masks, b, max_t, lens, t, dev)
    return feats.masked_fill(freq[:, None, :] | time[:, :, None], 0.0)


class StackSubsampler(nn.Module):
    """Concatenate 4 consecutive frames (a trailing partial group is dropped), then project."""

    factor = 4

    def __init__(self, n_mels: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_mels * self.factor, d_model)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, f = x.shape
        t4 = t // self.factor
        x = x[:, : t4 * self.factor].reshape(b, t4, f * self.factor)
        return self.proj(x.to(self.proj.weight.dtype)), torch.div(
            lens, self.factor, rounding_mode="floor"
        )


class ConvSubsampler(nn.Module):
    """Two unpadded 3x3 stride-2 convolutions over (time, mel), then project to ``d_model``.
    Without padding an output frame sees only input frames 4t..4t+6, never the padding."""

    def __init__(self, n_mels: int, d_model: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2),
            nn.ReLU(),
        )
        self.proj = nn.Linear(channels * ((n_mels - 1) // 2 - 1) // 2, d_model)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] < 7:
            x = F.pad(x, (0, 0, 0, 7 - x.shape[1]))
        x = self.conv(x.to(self.proj.weight.dtype)[:, None])  # [B, C, T', F']
        x = self.proj(x.permute(0, 2, 1, 3).flatten(2))
        for _ in range(2):
            lens = torch.div(lens - 3, 2, rounding_mode="floor") + 1
        return x, lens.clamp_min(0)


class Frontend(nn.Module):
    """``audio [B,S], audio_lens [B]`` → ``(frames [B,T,d_model], lens [B])`` at 40 ms per frame."""

    def __init__(self, cfg: FrontendConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.log_mel = LogMel(cfg.n_mels)
        if cfg.subsampling == "stack":
            self.subsample: nn.Module = StackSubsampler(cfg.n_mels, d_model)
        else:
            self.subsample = ConvSubsampler(cfg.n_mels, d_model, cfg.conv_channels)

    def forward(
        self, audio: torch.Tensor, audio_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats, lens = self.log_mel(audio, audio_lens)
        if self.cfg.normalize == "utterance":
            feats = normalize_utterance(feats, lens)
        if self.training:
            feats = spec_augment(feats, lens, self.cfg.specaug)
        return self.subsample(feats, lens)
