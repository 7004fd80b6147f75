"""Audio in and out: read any soundfile format as 16 kHz mono, encode/decode FLAC bytes.

Shards store 16-bit PCM FLAC at 16 kHz: lossless for the 16-bit inputs nearly every corpus has, so
a shard decodes back to the input's exact PCM; other inputs are resampled (soxr) and quantised.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 8000
"""Lower rates cannot carry the 0–8 kHz band the model's features use."""


class AudioError(ValueError):
    """An input that cannot be used; ``reason`` is the skip-counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_int16_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mono int16 at 16 kHz from soundfile output (int16 passes through bit-exact)."""
    if audio.ndim == 2:
        audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if rate == SAMPLE_RATE and audio.dtype == np.int16:
        return np.ascontiguousarray(audio)
    audio = audio.astype(np.float32) / (32768.0 if audio.dtype == np.int16 else 1.0)
    if rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    return np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def read_file(path: str, start: float = 0.0, duration: float | None = None) -> np.ndarray:
    """A file (or a ``start``/``duration`` segment of it, in seconds) as 16 kHz mono int16."""
    try:
        info = sf.info(path)
        first = int(round(start * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        subtype_int = info.subtype in ("PCM_16", "PCM_S8", "PCM_U8")
        audio, rate = sf.read(
            path, start=first, frames=frames, dtype="int16" if subtype_int else "float32"
        )
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError("unreadable_audio", f"{path}: {e}") from e
    if rate < MIN_SAMPLE_RATE:
        raise AudioError("sample_rate", f"{path}: {rate} Hz is below {MIN_SAMPLE_RATE} Hz")
    if audio.size == 0:
        raise AudioError("empty_audio", f"{path}: no samples")
    if audio.dtype != np.int16 and not np.isfinite(audio).all():
        raise AudioError("nonfinite_audio", f"{path}: NaN or infinite samples")
    return to_int16_16k(audio, rate)


def read_float(path: str, start: float = 0.0, duration: float | None = None) -> np.ndarray:
    """:func:`read_file` as float32 in [-1, 1): what decoding the FLAC make-shards would store
    for this file gives back."""
    return read_file(path, start, duration).astype(np.float32) / 32768.0


def file_seconds(path: str, start: float = 0.0, duration: float | None = None) -> float:
    """Seconds of audio :func:`read_file` would return, from the header alone."""
    if duration is not None:
        return duration
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError("unreadable_audio", f"{path}: {e}") from e
    return info.frames / info.samplerate - start


def encode_flac(pcm: np.ndarray) -> bytes:
    """16 kHz mono int16 -> FLAC bytes (deterministic: no timestamps)."""
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_bytes(data: bytes, declared_rate: int | None = None) -> np.ndarray:
    """FLAC/WAV bytes -> float32 16 kHz mono in [-1, 1]; raises :class:`AudioError` with the reason."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, subtype = f.samplerate, f.subtype
            audio = f.read(dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError("corrupt_audio", str(e)) from e
    if declared_rate is not None and rate != declared_rate:
        raise AudioError("sample_rate", f"audio is {rate} Hz, its label says {declared_rate} Hz")
    if rate < MIN_SAMPLE_RATE:
        raise AudioError("sample_rate", f"{rate} Hz is below {MIN_SAMPLE_RATE} Hz")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise AudioError("empty_audio", "no samples")
    # Integer PCM (all FLAC) cannot hold NaN; only float formats need the scan.
    if subtype in ("FLOAT", "DOUBLE") and not np.isfinite(audio).all():
        raise AudioError("nonfinite_audio", "NaN or infinite samples")
    if rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def header(data: bytes) -> tuple[int, int]:
    """``(sample_rate, frames)`` from the header of FLAC/WAV bytes, without decoding."""
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError("corrupt_audio", str(e)) from e
    return info.samplerate, info.frames
