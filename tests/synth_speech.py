"""Deterministic speech-like audio for tests (no TTS on CI machines).

Voiced segments are harmonics of a moving pitch under a formant envelope (additive synthesis),
fricatives are band-limited noise, with pauses, a noise floor and 16-bit quantisation: a spectrum
with the structure, dynamic range and silences of speech, from numpy alone.
"""

from __future__ import annotations

import numpy as np

SR = 16_000
# (F1, F2, F3) in Hz of a few English vowels (Peterson & Barney averages).
VOWELS = [
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
]
FRICATIVES = [(3500, 7500), (1800, 4000), (5000, 7900)]  # noise bands: "s", "sh", "f"-like


def _fade(x: np.ndarray, ms: float = 10.0) -> np.ndarray:
    n = min(len(x) // 2, int(SR * ms / 1000))
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    x = x.copy()
    x[:n] *= ramp
    x[len(x) - n :] *= ramp[::-1]
    return x


def vowel(formants, seconds: float, f0_start: float, f0_end: float, phase_seed: int = 0):
    n = int(seconds * SR)
    f0 = np.linspace(f0_start, f0_end, n)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    offsets = np.random.default_rng(phase_seed).uniform(0, 2 * np.pi, 64)
    out = np.zeros(n)
    for h in range(1, int(7800 / max(f0_start, f0_end))):
        f = h * f0
        gain = 1.0 / h  # glottal source tilt
        for k, fc in enumerate(formants):
            bw = 60.0 + 20.0 * k
            gain = gain * fc**2 / np.sqrt((fc**2 - f**2) ** 2 + (bw * f) ** 2)
        out += gain * np.sin(h * phase + offsets[h % 64])
    return _fade(out / np.abs(out).max())


def fricative(band, seconds: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(int(seconds * SR))
    spec = np.fft.rfft(noise)
    hz = np.fft.rfftfreq(len(noise), 1 / SR)
    spec[(hz < band[0]) | (hz > band[1])] = 0
    out = np.fft.irfft(spec, len(noise))
    return _fade(out / np.abs(out).max())


def finish(x: np.ndarray, seed: int, peak: float = 0.5, floor: float = 3e-4) -> np.ndarray:
    """Peak-normalise, add a noise floor and quantise to 16 bits like a recording."""
    x = peak * x / np.abs(x).max() + floor * np.random.default_rng(seed).standard_normal(len(x))
    return (np.round(np.clip(x, -1, 1) * 32767) / 32767).astype(np.float32)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Random syllable-like sequence of vowels, fricatives and pauses, about ``seconds`` long."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    while sum(map(len, parts)) < seconds * SR:
        kind = rng.choice(3, p=[0.6, 0.25, 0.15])
        dur = rng.uniform(0.06, 0.25)
        if kind == 0:
            f0 = rng.uniform(90, 220)
            v = VOWELS[rng.integers(len(VOWELS))]
            parts.append(rng.uniform(0.3, 1) * vowel(v, dur, f0, f0 * rng.uniform(0.8, 1.2), seed))
        elif kind == 1:
            band = FRICATIVES[rng.integers(len(FRICATIVES))]
            parts.append(rng.uniform(0.1, 0.4) * fricative(band, dur, int(rng.integers(1 << 30))))
        else:
            parts.append(np.zeros(int(dur * SR)))
    return finish(np.concatenate(parts)[: int(seconds * SR)], seed)


def token_sound(token: int, seconds: float = 0.12) -> np.ndarray:
    """A fixed, distinct sound per token id: vowel × pitch, or a fricative band."""
    sounds = len(VOWELS) * 2 + len(FRICATIVES)
    token %= sounds
    if token < len(VOWELS) * 2:
        f0 = 110.0 if token % 2 == 0 else 190.0
        return vowel(VOWELS[token // 2], seconds, f0, f0 * 1.1, token)
    return 0.4 * fricative(FRICATIVES[token - 2 * len(VOWELS)], seconds, token)


def utterance(tokens: list[int], seed: int = 0, gap: float = 0.04) -> np.ndarray:
    """Token sounds separated by pauses (so a repeated token is two events, as CTC needs)."""
    silence = np.zeros(int(gap * SR))
    parts = [silence]
    for t in tokens:
        parts += [token_sound(t), silence]
    return finish(np.concatenate(parts), seed)
