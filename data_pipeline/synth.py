"""The embedded corpus: procedurally generated, speech-like, learnable in minutes on a CPU.

Sentences of 2–5 words from a 24-word vocabulary over 13 letters. Every letter is an 80–120 ms
segment with its own spectral signature: vowels and nasals are formant tones modulated by the
speaker's pitch (harmonic sidebands, like a voice), fricatives are noise bands, stops are a closure
plus a burst, glides move their formants. Speakers differ in pitch, vocal-tract length (formant scale), tempo, loudness and
noise floor, so a model must learn letters, not one voice.

    OUT/train                   pseudo-labelled: ``pl_noise`` of the labels are corrupted (word
                                substitutions/deletions) and get a lower ``pl_confidence``; the
                                true text is kept in ``clean_text``
    OUT/dev, OUT/test           the training speakers, gold labels
    OUT/test_unseen_speakers    speakers outside the training pitch/formant ranges
    OUT/test_fast               training speakers at 1.4x tempo
    OUT/test_noisy              white noise at 5 dB SNR
    OUT/test_telephone          300–3400 Hz band, as an 8 kHz phone line
    OUT/tokenizer.model         SentencePiece trained on OUT/train transcripts

Each split is a shard directory with ``index.json``, as ``omni-ds make-shards`` writes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from data_pipeline.audio import SAMPLE_RATE
from data_pipeline.index import scan_shard, write_index
from data_pipeline.shards import run_jobs, shard_name, write_shard

WORDS = (
    "sea sun mat fun ten lime rose kite note farm nest milk "
    "lake fire rust tone mask fast slim turn sofa lemon salt mine"
).split()
# letter -> (kind, parameters); formants in Hz for an average adult vocal tract.
LETTERS = {
    "a": ("vowel", (850, 1250, 2600)),
    "e": ("vowel", (480, 2100, 2800)),
    "i": ("vowel", (280, 2600, 3300)),
    "o": ("vowel", (560, 900, 2500)),
    "u": ("vowel", (300, 650, 2200)),
    "m": ("nasal", (250, 900, 2100)),
    "n": ("nasal", (250, 1800, 2700)),
    "l": ("glide", ((350, 900, 2900), (600, 1600, 2900))),
    "r": ("glide", ((650, 1500, 2500), (400, 1100, 1600))),
    "s": ("noise", (4800, 7800)),
    "f": ("noise", (1500, 3200)),
    "t": ("stop", (3200, 6500)),
    "k": ("stop", (1000, 2400)),
}


@dataclasses.dataclass(frozen=True)
class Speaker:
    f0: float
    formant_scale: float
    tempo: float
    """Segment length multiplier (< 1 is faster)."""
    gain: float
    snr_db: float


@dataclasses.dataclass(frozen=True)
class Split:
    name: str
    utterances: int
    speakers: tuple[int, int]
    """Range of speaker ids; ids >= 1000 draw from the unseen-speaker distribution."""
    tempo: float = 1.0
    snr_db: float | None = None
    telephone: bool = False
    pseudo_labels: bool = False


def speaker(sid: int) -> Speaker:
    rng = np.random.default_rng([7, sid])
    if sid >= 1000:  # outside the training ranges on both sides
        f0 = rng.choice([rng.uniform(60, 85), rng.uniform(250, 300)])
        scale = rng.choice([rng.uniform(0.82, 0.87), rng.uniform(1.14, 1.2)])
    else:
        f0, scale = rng.uniform(90, 240), rng.uniform(0.9, 1.1)
    return Speaker(f0, scale, rng.uniform(0.85, 1.2), rng.uniform(0.3, 0.8), rng.uniform(25, 40))


def _fade(x: np.ndarray, n: int = 80) -> np.ndarray:
    n = min(n, len(x) // 2)
    ramp = np.sin(np.linspace(0, np.pi / 2, n)) ** 2
    x[:n] *= ramp
    x[len(x) - n :] *= ramp[::-1]
    return x


def _band_noise(rng, n: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    hz = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spec[(hz < lo) | (hz > hi)] = 0
    out = np.fft.irfft(spec, n)
    return out / (np.abs(out).max() + 1e-9)


def letter(ch: str, spk: Speaker, tempo: float, rng) -> np.ndarray:
    """One letter as float64 audio."""
    kind, params = LETTERS[ch]
    n = int(rng.uniform(0.08, 0.12) * spk.tempo * tempo * SAMPLE_RATE)
    if kind == "noise":
        return _fade(0.35 * _band_noise(rng, n, *params))
    if kind == "stop":
        closure = np.zeros(int(0.4 * n))
        return np.concatenate([closure, _fade(0.6 * _band_noise(rng, n - len(closure), *params))])
    f0 = spk.f0 * np.linspace(1.0, rng.uniform(0.85, 1.15), n)
    pulses = (0.5 + 0.5 * np.cos(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE)) ** 6
    start, end = params if kind == "glide" else (params, params)
    tone = np.zeros(n)
    for k, (f_start, f_end) in enumerate(zip(start, end)):
        jitter = spk.formant_scale * rng.uniform(0.97, 1.03)
        track = np.linspace(f_start, f_end, n) * jitter
        phase = 2 * np.pi * np.cumsum(track) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
        tone += (1.0, 0.6, 0.3)[k] * np.sin(phase)
    return _fade(tone * pulses * (0.5 if kind == "nasal" else 1.0))


def _telephone(x: np.ndarray) -> np.ndarray:
    spec = np.fft.rfft(x)
    hz = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    spec[(hz < 300) | (hz > 3400)] = 0
    return np.fft.irfft(spec, len(x))


def render(words: list[str], spk: Speaker, split: Split, rng) -> np.ndarray:
    """int16 16 kHz audio of ``words`` spoken by ``spk`` under the split's condition."""
    parts = [np.zeros(int(rng.uniform(0.1, 0.3) * SAMPLE_RATE))]
    for w in words:
        parts += [letter(ch, spk, split.tempo, rng) for ch in w]
        parts.append(np.zeros(int(rng.uniform(0.1, 0.16) * spk.tempo * split.tempo * SAMPLE_RATE)))
    parts.append(np.zeros(int(rng.uniform(0.1, 0.3) * SAMPLE_RATE)))
    x = np.concatenate(parts)
    x = spk.gain * x / (np.abs(x).max() + 1e-9)
    snr = spk.snr_db if split.snr_db is None else split.snr_db
    x = x + rng.standard_normal(len(x)) * np.sqrt(np.mean(x**2)) * 10 ** (-snr / 20)
    if split.telephone:
        x = _telephone(x)
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def corrupt(words: list[str], rng) -> list[str]:
    """A plausible wrong pseudo-label: one or two words substituted, or one deleted."""
    out = list(words)
    if len(out) > 2 and rng.random() < 0.3:
        del out[rng.integers(len(out))]
        return out
    for _ in range(rng.integers(1, 3)):
        i = rng.integers(len(out))
        out[i] = rng.choice([w for w in WORDS if w != out[i]])
    return out


def utterance(split: Split, i: int, seed: int, pl_noise: float) -> tuple[str, np.ndarray, dict]:
    rng = np.random.default_rng([seed, sum(map(ord, split.name)), i])
    sid = int(rng.integers(*split.speakers))
    words = [str(w) for w in rng.choice(WORDS, size=rng.integers(2, 6))]
    pcm = render(words, speaker(sid), split, rng)
    label = {"text": " ".join(words), "speaker": f"spk{sid:04d}"}
    if split.pseudo_labels:
        noisy = rng.random() < pl_noise
        heard = corrupt(words, rng) if noisy else words
        label.update(
            text=" ".join(heard),
            clean_text=" ".join(words),
            pl_teacher="synth-teacher",
            pl_confidence=round(
                float(rng.uniform(0.2, 0.75) if noisy else rng.uniform(0.7, 1.0)), 3
            ),
        )
    return f"{split.name}-{i:06d}", pcm, label


def splits(train: int) -> list[Split]:
    held = max(20, train // 12)
    return [
        Split("train", train, (0, 40), pseudo_labels=True),
        Split("dev", held, (0, 40)),
        Split("test", held, (0, 40)),
        Split("test_unseen_speakers", held, (1000, 1020)),
        Split("test_fast", held, (0, 40), tempo=0.7),
        Split("test_noisy", held, (0, 40), snr_db=5.0),
        Split("test_telephone", held, (0, 40), telephone=True),
    ]


def _shard_job(job: tuple) -> tuple[str, dict]:
    path, split, first, count, seed, pl_noise = job
    write_shard(path, (utterance(split, i, seed, pl_noise) for i in range(first, first + count)))
    return split.name, scan_shard(path)


def generate(
    out: Path,
    *,
    train_utterances: int = 2400,
    seed: int = 0,
    pl_noise: float = 0.2,
    shard_size: int = 300,
    vocab_size: int = 128,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Write every split and the tokenizer under ``out``; returns utterances per split."""
    from data_pipeline.tokenizer import train_tokenizer

    jobs = []
    for split in splits(train_utterances):
        (out / split.name).mkdir(parents=True, exist_ok=True)
        for k, first in enumerate(range(0, split.utterances, shard_size)):
            count = min(shard_size, split.utterances - first)
            jobs.append((out / split.name / shard_name(k), split, first, count, seed, pl_noise))
    results = run_jobs(_shard_job, jobs, workers or os.cpu_count() or 1, "synth", progress)
    by_split: dict[str, list[dict]] = {}
    for name, entry in results:
        by_split.setdefault(name, []).append(entry)
    for name, entries in by_split.items():
        write_index(out / name, entries)
    train_tokenizer([out / "train"], out / "tokenizer", vocab_size)
    return {name: sum(e["num_samples"] for e in entries) for name, entries in by_split.items()}
