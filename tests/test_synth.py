"""omni-ds synth: every split as indexed shards, deterministic, with pseudo-label noise the
confidence filter removes and test sets that really are shifted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.config import DataConfig
from data_pipeline.index import load_index
from data_pipeline.loader import SpeechLoader
from data_pipeline.synth import generate
from data_pipeline.tokenizer import Tokenizer
from omni_ds.cli import main

SPLITS = [
    "train",
    "dev",
    "test",
    "test_unseen_speakers",
    "test_fast",
    "test_noisy",
    "test_telephone",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    argv = ["synth", str(out), "--train-utterances", "240", "--shard-size", "60", "--workers", "2"]
    assert main(argv) == 0
    return out


def samples(directory: Path) -> list[tuple[np.ndarray, dict]]:
    out = []
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(members):
            if name.endswith(".flac"):
                audio, _ = sf.read(io.BytesIO(members[name]), dtype="float32")
                out.append((audio, json.loads(members[name.replace(".flac", ".json")])))
    return out


def test_every_split_indexed_with_a_tokenizer(corpus):
    counts = {name: load_index(corpus / name).num_samples for name in SPLITS}
    assert counts == {"train": 240, **{name: 20 for name in SPLITS[1:]}}
    train = load_index(corpus / "train")
    assert len(train.shards) == 4 and not any(s["bad"] for s in train.shards)
    seconds = [row[1] for s in train.shards for row in s["samples"]]
    assert 0.8 < min(seconds) and max(seconds) < 4.0
    tok = Tokenizer(corpus / "tokenizer.model")
    assert tok.vocab_size <= 128
    for _, label in samples(corpus / "dev"):
        assert tok.decode(tok.encode(label["text"])) == label["text"]


def test_deterministic(corpus, tmp_path):
    generate(tmp_path, train_utterances=240, shard_size=60, workers=1, progress=False)
    for name in SPLITS:
        digests = [s["sha256"] for s in load_index(corpus / name).shards]
        assert digests == [s["sha256"] for s in load_index(tmp_path / name).shards]


def test_pseudo_label_noise_is_what_the_confidence_filter_removes(corpus):
    labels = [label for _, label in samples(corpus / "train")]
    wrong = [lab for lab in labels if lab["text"] != lab["clean_text"]]
    assert 0.1 < len(wrong) / len(labels) < 0.3
    assert np.mean([lab["pl_confidence"] for lab in wrong]) < 0.55
    assert all(lab["pl_teacher"] == "synth-teacher" for lab in labels)
    cfg = DataConfig(train=[corpus / "train"], min_pl_confidence=0.75, num_workers=0)
    loader = SpeechLoader(cfg, seed=0)
    texts = {text for batch in loader for text in batch["texts"]}
    clean = {lab["text"] for lab in labels if lab["pl_confidence"] >= 0.75}
    assert texts == clean and not texts & {lab["text"] for lab in wrong} - clean
    assert loader.skipped() == {
        "low_confidence": sum(lab["pl_confidence"] < 0.75 for lab in labels)
    }


def _band_share(audio: np.ndarray, lo: float, hi: float) -> float:
    power = np.abs(np.fft.rfft(audio)) ** 2
    hz = np.fft.rfftfreq(len(audio), 1 / 16000)
    return power[(hz >= lo) & (hz < hi)].sum() / power.sum()


def test_shifted_test_sets(corpus):
    test = samples(corpus / "test")
    train_speakers = {label["speaker"] for _, label in samples(corpus / "train")}
    unseen = {label["speaker"] for _, label in samples(corpus / "test_unseen_speakers")}
    assert {label["speaker"] for _, label in test} <= train_speakers and not unseen & train_speakers
    median = np.median([len(a) for a, _ in test])
    assert np.median([len(a) for a, _ in samples(corpus / "test_fast")]) < 0.85 * median
    tel = np.mean([_band_share(a, 3600, 8000) for a, _ in samples(corpus / "test_telephone")])
    assert tel < 1e-3 < np.mean([_band_share(a, 3600, 8000) for a, _ in test])

    def snr(items):
        # Noise floor: the quietest 10% of 20 ms frames against the loudest 10%.
        values = []
        for audio, _ in items:
            frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
            energy = np.sort((frames**2).mean(axis=1))
            k = max(1, len(energy) // 10)
            values.append(10 * np.log10(energy[-k:].mean() / energy[:k].mean()))
        return np.median(values)

    assert snr(samples(corpus / "test_noisy")) < snr(test) - 10
