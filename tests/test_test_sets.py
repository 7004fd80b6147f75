"""Evaluation test sets: real FLAC in tar shards and JSONL manifests, read completely and in order."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from omni_ds.eval.test_sets import open_test_set, read_test_set


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_shard(path, items):
    with tarfile.open(path, "w") as tar:
        for key, audio, text in items:
            buf = io.BytesIO()
            sf.write(buf, audio, 16000, format="FLAC", subtype="PCM_16")
            for name, data in (
                (f"{key}.flac", buf.getvalue()),
                (f"{key}.json", json.dumps({"text": text}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shard_dir_reads_every_utterance_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(
        shards / "shard-000001.tar",
        [("b1", tone(0.5, 16000), "two"), ("b2", tone(0.25, 16000), "three")],
    )
    write_shard(shards / "shard-000000.tar", [("a1", tone(1.0, 16000), "One, two!")])
    utts = list(read_test_set(shards))
    assert [u.key for u in utts] == ["a1", "b1", "b2"]
    assert [u.text for u in utts] == ["One, two!", "two", "three"]  # references untouched
    assert [len(u.audio) for u in utts] == [16000, 8000, 4000]
    np.testing.assert_allclose(utts[0].audio, tone(1.0, 16000), atol=1e-4)  # 16-bit FLAC
    # 1.0 s budget: [a1] alone (1 s); then b1 + b2 (2 x 0.5 s)
    batches = list(open_test_set(shards, batch_seconds=1.0))
    assert [b["keys"] for b in batches] == [["a1"], ["b1", "b2"]]
    assert batches[1]["audio"].shape == (2, 8000)
    assert batches[1]["audio_lens"].tolist() == [8000, 4000]
    assert batches[1]["audio"][1, 4000:].abs().max() == 0


def test_manifest_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([tone(1.0, 8000, 200), tone(1.0, 8000, 200)], axis=1)
    sf.write(tmp_path / "x.wav", stereo, 8000)
    sf.write(tmp_path / "y.flac", tone(2.0, 16000), 16000)
    manifest = tmp_path / "test.jsonl"
    rows = [
        {"audio_filepath": "x.wav", "text": "x", "duration": 1.0},
        {"audio_filepath": str(tmp_path / "y.flac"), "text": "y", "offset": 0.5, "duration": 1.0},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    utts = list(read_test_set(manifest))
    assert [u.text for u in utts] == ["x", "y"]
    assert len(utts[0].audio) == 16000 and utts[0].audio.dtype == np.float32
    # a 200 Hz tone stays a 200 Hz tone after 8 -> 16 kHz
    spectrum = np.abs(np.fft.rfft(utts[0].audio))
    assert np.argmax(spectrum) == pytest.approx(200, abs=1)
    assert len(utts[1].audio) == 16000  # the 0.5-1.5 s segment
    np.testing.assert_allclose(utts[1].audio, tone(2.0, 16000)[8000:24000], atol=1e-4)


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        list(read_test_set(tmp_path))
    write_shard(tmp_path / "s.tar", [("a", tone(0.1, 16000), "a")])
    with tarfile.open(tmp_path / "s.tar", "a") as tar:
        info = tarfile.TarInfo("orphan.flac")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="incomplete"):
        list(read_test_set(tmp_path / "s.tar"))
