"""The data users bring, read right or refused loudly: multi-channel PCM_16 audio, upper-case
LibriSpeech transcripts, tokenizers that do not fit, NeMo tarred datasets and Lhotse manifests
(written by the real lhotse package)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from synth_speech import speech_like
from test_shards import read_shards, report

from data_pipeline.config import DataConfig
from data_pipeline.loader import DataError, SpeechLoader
from data_pipeline.tokenizer import Tokenizer
from omni_ds.cli import main


def tones(seconds: float, rate: int, freqs, rms: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * f * t + k) for k, f in enumerate(freqs))
    return x * rms / np.sqrt(np.mean(x**2))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(x, np.float64) / 32768) ** 2)))


def make(argv: list, capsys=None) -> int:
    return main(["make-shards", *map(str, argv), "--workers", "1"])


def lowercase_tokenizer(path: Path, sentences: list[str], vocab: int = 40) -> Tokenizer:
    """A SentencePiece model trained directly (as a user's own would be) on ``sentences``."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(path),
                                   vocab_size=vocab, hard_vocab_limit=False, bos_id=-1,
                                   eos_id=-1, minloglevel=2)  # fmt: skip
    return Tokenizer(f"{path}.model")


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_stereo_pcm16_keeps_the_level_of_the_chosen_channel(tmp_path, fmt):
    """Today's defect: int16 channels were averaged to float64 in int16 units, then clipped to
    full scale (rms 0.21 in, 0.999 out)."""
    lines, expected = [], {}
    for rate in (8000, 16000, 44100):
        a = tones(1.0, rate, (300, 1100), 0.21)  # speaker A on channel 0
        b = tones(1.0, rate, (700, 2300), 0.05)  # speaker B on channel 1
        stereo = np.round(np.stack([a, b], 1) * 32767).astype(np.int16)
        name = f"call{rate}.{fmt.lower()}"
        sf.write(tmp_path / name, stereo, rate, format=fmt, subtype="PCM_16")
        for channel, level in ((0, rms(stereo[:, 0])), (1, rms(stereo[:, 1])),
                               ("mix", rms(stereo.astype(np.float64).mean(1)))):  # fmt: skip
            key = f"r{rate}_c{channel}"
            lines.append({"audio_filepath": name, "text": "x", "channel": channel, "key": key})
            expected[key] = (level, stereo[:, channel] if rate == 16000 and channel != "mix"
                             else None)  # fmt: skip
        lines.append({"audio_filepath": name, "text": "x", "key": f"r{rate}_auto"})
    # One speaker recorded on both channels: auto mode mixes them (bit-exact at 16 kHz).
    same = np.round(np.repeat(tones(1.0, 16000, (500,), 0.3)[:, None], 2, 1) * 32767)
    sf.write(tmp_path / f"mono2.{fmt.lower()}", same.astype(np.int16), 16000, format=fmt,
             subtype="PCM_16")  # fmt: skip
    lines.append({"audio_filepath": f"mono2.{fmt.lower()}", "text": "x", "key": "same"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert make([tmp_path / "m.jsonl", "--out", tmp_path / "out"]) == 0
    got = read_shards(tmp_path / "out")
    for key, (level, exact) in expected.items():
        assert rms(got[key][0]) == pytest.approx(level, rel=0.01), key
        if exact is not None:
            np.testing.assert_array_equal(got[key][0], exact)
    np.testing.assert_array_equal(got["same"][0], same[:, 0])
    # Two speakers and no channel asked: refused, with the fix, never mixed.
    assert report(tmp_path / "out") == {
        f"r{r}_auto": "channel_ambiguous" for r in (8000, 16000, 44100)
    }
    assert "--channel" in (tmp_path / "out" / "report.jsonl").read_text()
    # make-shards --channel is the default for rows that do not choose.
    assert make([tmp_path / "m.jsonl", "--out", tmp_path / "c1", "--channel", "1"]) == 0
    got = read_shards(tmp_path / "c1")
    for rate in (8000, 16000, 44100):
        assert rms(got[f"r{rate}_auto"][0]) == pytest.approx(expected[f"r{rate}_c1"][0], rel=0.01)


def test_float_audio_above_full_scale_is_scaled_not_clipped_and_says_so(tmp_path, capsys):
    """A float WAV may hold values beyond [-1, 1] (gain after processing): it was clipped to
    full scale in the shard, silently. Now it is scaled (linear: the waveform keeps its shape)
    and the sample's label and a log line say by how much; in-range audio is untouched."""
    loud = tones(1.0, 16000, (300, 1100), 0.8)  # peak ~1.6
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")
    sf.write(tmp_path / "loud48k.wav", tones(1.0, 48000, (300, 1100), 0.8), 48000,
             subtype="FLOAT")  # fmt: skip
    sf.write(tmp_path / "fine.wav", loud / 4, 16000, subtype="FLOAT")
    lines = [{"audio_filepath": f, "text": "x"} for f in ("loud.wav", "loud48k.wav", "fine.wav")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert make([tmp_path / "m.jsonl", "--out", tmp_path / "out"]) == 0
    err = capsys.readouterr().err
    got = read_shards(tmp_path / "out")
    peak = np.abs(loud).max()
    pcm, label = got["loud"]
    assert label["gain"] == pytest.approx(32767 / 32768 / peak, rel=1e-5)
    assert "loud (" in err and "above full scale" in err and "loud48k (" in err
    # Scaled, not clipped: the waveform is the input times the gain, to the 16-bit step.
    np.testing.assert_allclose(pcm / 32768, loud * label["gain"], atol=1 / 32768)
    assert np.abs(pcm).max() == 32767  # peaks at full scale
    assert 0.45 < got["loud48k"][1]["gain"] < 0.75
    assert "gain" not in got["fine"][1] and "fine (" not in err
    np.testing.assert_array_equal(got["fine"][0], np.round(loud / 4 * 32768).astype(np.int16))


def _librispeech(root: Path, texts: list[str]) -> dict[str, np.ndarray]:
    folder = root / "19" / "198"
    folder.mkdir(parents=True)
    audio = {}
    for u in range(len(texts)):
        key = f"19-198-{u:04d}"
        audio[key] = np.round(speech_like(0.6 + 0.1 * u, u) * 32767).astype(np.int16)
        sf.write(folder / f"{key}.flac", audio[key], 16000, subtype="PCM_16")
    lines = [f"19-198-{u:04d} {text}" for u, text in enumerate(texts)]
    (folder / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return audio


TEXTS = ["DO YOU SEE IT", "YOU DO", "SEE THE SEA", "IT IS THE SEA", "DO IT", "THE TIDE IS OUT"]


def test_upper_case_librispeech_trains_with_a_lower_case_tokenizer(tmp_path):
    _librispeech(tmp_path / "ls", TEXTS)
    assert make([tmp_path / "ls", "--out", tmp_path / "shards"]) == 0
    assert read_shards(tmp_path / "shards")["19-198-0000"][1]["text"] == "DO YOU SEE IT"  # as given
    tok = lowercase_tokenizer(tmp_path / "lower", [t.lower() for t in TEXTS] * 4)
    assert tok.unk_id not in tok.encode("DO YOU")  # was ▁ <unk> ▁ <unk>
    cfg = DataConfig(train=[str(tmp_path / "shards")], num_workers=0, num_buckets=1,
                     error_rate_min_samples=1)  # fmt: skip
    batches = list(SpeechLoader(cfg, tok))
    decoded = sorted(tok.decode(b["tokens"][j, : b["token_lens"][j]].tolist())
                     for b in batches for j in range(len(b["keys"])))  # fmt: skip
    assert decoded == sorted(t.lower() for t in TEXTS)
    assert all(tok.unk_id not in b["tokens"][j, : b["token_lens"][j]].tolist()
               for b in batches for j in range(len(b["keys"])))  # fmt: skip


def test_a_tokenizer_that_does_not_cover_the_corpus_stops_the_run_naming_the_fix(tmp_path):
    _librispeech(tmp_path / "ls", TEXTS)
    assert make([tmp_path / "ls", "--out", tmp_path / "shards"]) == 0
    other = lowercase_tokenizer(tmp_path / "other", ["a mat", "an ant", "man nan"] * 4, vocab=12)
    cfg = DataConfig(train=[str(tmp_path / "shards")], num_workers=0, num_buckets=1,
                     error_rate_min_samples=2, max_error_rate=1.0)  # fmt: skip
    loader = SpeechLoader(cfg, other)
    with pytest.raises(DataError, match=r"have <unk> in their targets, above data.max_unk_rate"
                                        r"=0.01: .*omni-ds train-tokenizer"):  # fmt: skip
        list(loader)
    assert loader.skipped()["unk_target"] >= 2


def _wav(x: np.ndarray, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def test_nemo_tarred_dataset_keeps_every_utterance(tmp_path):
    """Today: "0 utterances, 80 inputs left out", exit 0."""
    audio, lines = {}, []
    for shard in range(2):
        with tarfile.open(tmp_path / f"audio_{shard}.tar", "w") as tar:
            for u in range(3):
                key = f"s{shard}u{u}"
                audio[key] = np.round(speech_like(0.5 + 0.1 * u, 10 * shard + u) * 32767).astype(
                    np.int16
                )
                data = _wav(audio[key], "FLAC" if u % 2 else "WAV")
                name = f"{key}.{'flac' if u % 2 else 'wav'}"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                lines.append({"audio_filepath": name, "text": f"words {key}", "shard_id": shard,
                              "duration": len(audio[key]) / 16000})  # fmt: skip
    lines.append({"audio_filepath": "gone.wav", "text": "lost", "shard_id": 1, "duration": 1.0})
    (tmp_path / "tarred_audio_manifest.json").write_text(
        "".join(json.dumps(r) + "\n" for r in lines)
    )
    assert make([tmp_path, "--out", tmp_path / "out"]) == 0
    got = read_shards(tmp_path / "out")
    assert sorted(got) == sorted(audio)
    for key, x in audio.items():
        np.testing.assert_array_equal(got[key][0], x)
        assert got[key][1]["text"] == f"words {key}"
    rows = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").open()]
    assert [(r["key"], r["reason"]) for r in rows] == [("gone", "missing_audio")]
    assert f"file not found: gone.wav in {tmp_path / 'audio_1.tar'}" in rows[0]["error"]
    # Nothing usable at all: a non-zero exit, not "0 utterances" and 0.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tarred_audio_manifest.json").write_text(json.dumps(lines[-1]) + "\n")
    assert make([tmp_path / "bad", "--out", tmp_path / "none"]) == 1


def test_lhotse_cuts_and_supervision_manifests_keep_every_supervision(tmp_path):
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    a = np.round(speech_like(3.0, 1) * 32767).astype(np.int16)
    b = np.round(speech_like(3.0, 2) * 0.3 * 32767).astype(np.int16)
    sf.write(tmp_path / "call.wav", np.stack([a, b], 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "read.flac", a[:24000], 16000, subtype="PCM_16")
    call, read = (
        Recording.from_file(tmp_path / "call.wav"),
        Recording.from_file(tmp_path / "read.flac"),
    )
    sups = [
        SupervisionSegment("A1", call.id, start=0.25, duration=1.0, channel=0, text="HELLO", speaker="A"),
        SupervisionSegment("B1", call.id, start=1.0, duration=1.5, channel=1, text="hi there", speaker="B"),
        SupervisionSegment("R1", read.id, start=0.0, duration=1.5, channel=0, text="read speech"),
    ]  # fmt: skip
    expected = {"A1": a[4000:20000], "B1": b[16000:40000], "R1": a[:24000]}
    recordings = RecordingSet.from_recordings([call, read])
    supervisions = SupervisionSet.from_segments(sups)
    cuts = CutSet.from_manifests(recordings=recordings, supervisions=supervisions)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    cuts.trim_to_supervisions(keep_overlapping=False).to_file(tmp_path / "trimmed_cuts.jsonl.gz")
    recordings.to_file(tmp_path / "recordings.jsonl.gz")
    supervisions.to_file(tmp_path / "supervisions.jsonl.gz")
    for name in ("cuts.jsonl.gz", "trimmed_cuts.jsonl.gz", "supervisions.jsonl.gz"):
        out = tmp_path / name.split(".")[0]
        assert make([tmp_path / name, "--out", out]) == 0
        got = read_shards(out)
        assert sorted(got) == sorted(expected), name
        for key, x in expected.items():
            np.testing.assert_array_equal(got[key][0], x)
        assert got["A1"][1]["text"] == "HELLO" and got["A1"][1]["speaker"] == "A"
        assert not (out / "report.jsonl").read_text()
