"""Audio in and out: read any soundfile format as 16 kHz mono, encode/decode FLAC bytes.

Shards store 16-bit PCM FLAC at 16 kHz: lossless for the 16-bit inputs nearly every corpus has, so
a shard decodes back to the input's exact PCM; other inputs are resampled (soxr) and quantised.

Multi-channel audio (:func:`select_channel`): ``channel`` N keeps channel N (0-based) as it is;
``"mix"`` averages the channels; ``None`` (auto) keeps mono as it is and mixes channels only when
they carry the same signal (one speaker, recorded in stereo: correlation of every channel with
the mean at least :data:`SAME_SIGNAL`). Channels that differ (telephone corpora such as
Switchboard put one speaker on each) are refused under ``channel_ambiguous`` until a channel is
chosen, since a mix of two speakers is a transcript of neither.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 8000
"""Lower rates cannot carry the 0–8 kHz band the model's features use."""
SAME_SIGNAL = 0.9
"""Correlation above which the channels of a recording are taken to carry one signal."""
FULL_SCALE = 32767 / 32768
"""The largest value 16-bit PCM holds, as a float."""
SILENCE_PEAK = 1 / 32768
"""Audio whose peak is at most one 16-bit step is digital silence: no transcript can match it."""


class AudioError(ValueError):
    """An input that cannot be used; ``reason`` is the skip-counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _as_float(audio: np.ndarray) -> np.ndarray:
    return audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio


def select_channel(audio: np.ndarray, channel: int | str | None = None) -> np.ndarray:
    """One channel of soundfile output ``[frames]`` or ``[frames, channels]`` (module docstring).

    A kept channel keeps its dtype (int16 stays bit-exact); a mix is float32 in [-1, 1).
    """
    if audio.ndim == 1:
        audio = audio[:, None]
    n = audio.shape[1]
    if isinstance(channel, int) and not isinstance(channel, bool):
        if not 0 <= channel < n:
            raise AudioError("bad_channel", f"channel {channel} asked, the audio has {n}")
        return np.ascontiguousarray(audio[:, channel])
    if channel not in (None, "mix"):
        raise AudioError("bad_channel", f"channel {channel!r}: use a 0-based number or 'mix'")
    if n == 1:
        return audio[:, 0]
    x = _as_float(audio).astype(np.float64)
    mean = x.mean(axis=1)
    if channel is None:
        energy = np.sqrt((x**2).sum(axis=0) * (mean**2).sum())
        agree = (x * mean[:, None]).sum(axis=0) / np.maximum(energy, 1e-30)
        if agree.min() < SAME_SIGNAL:
            raise AudioError(
                "channel_ambiguous",
                f"{n} channels with different signals (one speaker per channel?): choose one "
                "with the manifest's 'channel' field or `make-shards --channel N`, or mix them "
                "with --channel mix",
            )
    return mean.astype(np.float32)


def to_int16_16k(
    audio: np.ndarray, rate: int, channel: int | str | None = None
) -> tuple[np.ndarray, float]:
    """Mono int16 at 16 kHz from soundfile output (a 16 kHz int16 channel passes bit-exact), and
    the gain applied to it: 1.0, except for float audio above full scale (a float WAV may hold
    values beyond [-1, 1]), which is scaled down to peak at full scale instead of clipped: a
    linear change keeps the speech, clipping would distort it."""
    audio = select_channel(audio, channel)
    if rate == SAMPLE_RATE and audio.dtype == np.int16:
        return audio, 1.0
    audio = _as_float(audio)
    gain, peak = 1.0, float(np.abs(audio).max())
    if peak > 1.0:
        gain = FULL_SCALE / peak
        audio = audio * np.float32(gain)
    if rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    # The resampler may overshoot full scale by a few samples of in-range audio: those clip.
    return np.round(np.clip(audio, -1.0, FULL_SCALE) * 32768).astype(np.int16), gain


def _open(path: str, member: str | None):
    """What soundfile reads for ``path`` (or its tar ``member``); AudioError when missing."""
    if member is not None:
        from data_pipeline.tar_members import member_bytes

        try:
            return io.BytesIO(member_bytes(path, member))
        except OSError as e:
            reason = "missing_audio" if isinstance(e, FileNotFoundError) else "unreadable_audio"
            raise AudioError(reason, str(e)) from e
    if not os.path.exists(path):
        raise AudioError("missing_audio", f"file not found: {path}")
    return path


_WAV_DATA = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.M)


def _truncated(info) -> tuple[int, int] | None:
    """(declared, present) audio bytes of a WAV whose data chunk declares more than the file
    holds (cut off while copied): libsndfile reads what is there, which would pair part of the
    audio with the whole transcript. Streaming writers' placeholder sizes (0xFFFFFFFF) do not
    count."""
    m = _WAV_DATA.search(info.extra_info) if info.format == "WAV" else None
    if m is None or not int(m.group(2)) < int(m.group(1)) < 0xFFFFFF00:
        return None
    return int(m.group(1)), int(m.group(2))


def read_file(
    path: str,
    start: float = 0.0,
    duration: float | None = None,
    channel: int | str | None = None,
    member: str | None = None,
) -> tuple[np.ndarray, float]:
    """A file (or a ``start``/``duration`` segment of it, in seconds; or member ``member`` of the
    tar ``path``) as 16 kHz mono int16, ``channel`` chosen as :func:`select_channel` says, and
    the gain :func:`to_int16_16k` applied (1.0 unless float audio was above full scale)."""
    what = path if member is None else f"{path}:{member}"
    source = _open(path, member)
    try:
        info = sf.info(source)
        if not isinstance(source, str):
            source.seek(0)
        cut = _truncated(info)
        if cut:
            raise AudioError("truncated_audio", f"{what}: cut short: its header declares "
                             f"{cut[0]} bytes of audio, the file holds {cut[1]}")  # fmt: skip
        first = int(round(start * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        subtype_int = info.subtype in ("PCM_16", "PCM_S8", "PCM_U8")
        audio, rate = sf.read(
            source, start=first, frames=frames, dtype="int16" if subtype_int else "float32",
            always_2d=True,
        )  # fmt: skip
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError("unreadable_audio", f"{what}: {e}") from e
    if rate < MIN_SAMPLE_RATE:
        raise AudioError("sample_rate", f"{what}: {rate} Hz is below {MIN_SAMPLE_RATE} Hz")
    if audio.size == 0:
        raise AudioError("empty_audio", f"{what}: no samples")
    if audio.dtype != np.int16 and not np.isfinite(audio).all():
        raise AudioError("nonfinite_audio", f"{what}: NaN or infinite samples")
    try:
        return to_int16_16k(audio, rate, channel)
    except AudioError as e:
        raise AudioError(e.reason, f"{what}: {e}") from None


def reject_silence(audio: np.ndarray, what: str = "audio") -> None:
    """Raise ``silent_audio`` for digital silence (int16 or float in [-1, 1]): audio that comes
    with a transcript cannot be silent, so the pair is mislabelled."""
    peak = np.abs(audio.astype(np.float64)).max()
    if peak <= SILENCE_PEAK * (32768 if audio.dtype == np.int16 else 1):
        raise AudioError("silent_audio", f"{what}: digital silence (peak at most 1 LSB)")


def read_float(path: str, start: float = 0.0, duration: float | None = None,
               channel: int | str | None = None, member: str | None = None) -> np.ndarray:  # fmt: skip
    """:func:`read_file` as float32 in [-1, 1): what decoding the FLAC make-shards would store
    for this file gives back."""
    return read_file(path, start, duration, channel, member)[0].astype(np.float32) / 32768.0


def file_seconds(
    path: str, start: float = 0.0, duration: float | None = None, member: str | None = None
) -> float:
    """Seconds of audio :func:`read_file` would return, from the header alone."""
    if duration is not None:
        return duration
    source = _open(path, member)
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError("unreadable_audio", f"{path}: {e}") from e
    return info.frames / info.samplerate - start


def encode_flac(pcm: np.ndarray) -> bytes:
    """16 kHz mono int16 -> FLAC bytes (deterministic: no timestamps)."""
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_bytes(
    data: bytes, declared_rate: int | None = None, channel: int | str | None = None
) -> np.ndarray:
    """FLAC/WAV bytes -> float32 16 kHz mono in [-1, 1] (``channel`` as :func:`select_channel`);
    raises :class:`AudioError` with the reason."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, subtype = f.samplerate, f.subtype
            audio = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError("corrupt_audio", str(e)) from e
    if declared_rate is not None and rate != declared_rate:
        raise AudioError("sample_rate", f"audio is {rate} Hz, its label says {declared_rate} Hz")
    if rate < MIN_SAMPLE_RATE:
        raise AudioError("sample_rate", f"{rate} Hz is below {MIN_SAMPLE_RATE} Hz")
    if audio.size == 0:
        raise AudioError("empty_audio", "no samples")
    # Integer PCM (all FLAC) cannot hold NaN; only float formats need the scan.
    if subtype in ("FLOAT", "DOUBLE") and not np.isfinite(audio).all():
        raise AudioError("nonfinite_audio", "NaN or infinite samples")
    audio = select_channel(audio, channel)
    reject_silence(audio)
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
