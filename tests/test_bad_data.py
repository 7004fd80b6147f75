"""A corpus salted with every kind of bad input trains through, with exact skip counts per reason,
and the error-rate ceiling stops a run that reads too much garbage, naming the worst shard."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_pipeline.config import DataConfig
from data_pipeline.index import index_directory
from data_pipeline.loader import DataError, SpeechLoader
from data_pipeline.synth import splits, utterance
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from omni_ds.config.model import ModelConfig, MoEConfig
from omni_ds.model.encoder import build_model

SPLIT = splits(120)[0]


def audio_bytes(
    x: np.ndarray, rate: int = 16000, fmt: str = "FLAC", subtype: str = "PCM_16"
) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def label(text, rate: int = 16000) -> bytes:
    return json.dumps({"text": text, "sample_rate": rate}).encode()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good(i: int) -> list[tuple[str, bytes]]:
    key, pcm, meta = utterance(SPLIT, i, 0, 0.0)
    return [(f"{key}.flac", audio_bytes(pcm)), (f"{key}.json", label(meta["text"]))]


@pytest.fixture(scope="module")
def salted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("salted")
    tone = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    flac = audio_bytes((tone * 32767).astype(np.int16))
    nan = tone.copy()
    nan[100] = np.nan
    bad = [
        ("truncated.flac", flac[: len(flac) // 2]), ("truncated.json", label("cut off")),
        ("garbage.flac", bytes(range(256)) * 8), ("garbage.json", label("noise")),
        ("zero.wav", audio_bytes(np.zeros(0, np.float32), fmt="WAV", subtype="FLOAT")),
        ("zero.json", label("nothing")),
        ("nan.wav", audio_bytes(nan, fmt="WAV", subtype="FLOAT")), ("nan.json", label("nan")),
        ("rate.flac", audio_bytes(tone[::2], 8000)), ("rate.json", label("wrong rate", 16000)),
        ("low.flac", audio_bytes(tone[::4], 4000)), ("low.json", label("too low", 4000)),
        ("empty.flac", flac), ("empty.json", label("")),
        ("latin1.flac", flac), ("latin1.json", b'{"text": "caf\xe9"}'),
        ("orphan.flac", flac),
        ("hdr.flac", flac), ("hdr.json", label("header damaged")),
    ]  # fmt: skip
    members = good(0) + bad[:10] + good(1) + bad[10:] + good(2) + good(3)
    write_tar(out / "shard-000000.tar", members)
    # A damaged tar header: the scan steps over it, leaving hdr.flac without its label.
    data = bytearray((out / "shard-000000.tar").read_bytes())
    at = data.index(b"hdr.json")
    data[at : at + 512] = b"\x07" * 512
    (out / "shard-000000.tar").write_bytes(bytes(data))
    write_tar(out / "shard-000001.tar", [m for i in range(4, 8) for m in good(i)])
    write_tar(out / "shard-000002.tar", [m for i in range(8, 11) for m in good(i)])
    # The last member of shard 1 is cut short (a truncated tar: the scan flags it), and after
    # indexing shard 2 disappears.
    cut = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(cut[: cut.rindex(b"train-000007.json") + 520])
    index_directory(out)
    train_tokenizer([out], out / "tokenizer", 64)
    (out / "shard-000002.tar").unlink()
    return out


EXPECTED = {
    "corrupt_audio": 2,  # truncated FLAC (decode), garbage bytes (header)
    "empty_audio": 1,
    "nonfinite_audio": 1,
    "sample_rate": 2,  # label/audio mismatch, 4 kHz
    "empty_text": 1,
    "bad_label": 1,  # not UTF-8
    "corrupt_member": 3,  # orphan audio, damaged header, truncated tar
    "missing_shard": 3,
}


def test_salted_corpus_trains_through_with_exact_counts(salted):
    tok = Tokenizer(salted / "tokenizer.model")
    cfg = DataConfig(
        train=[salted], max_duration=5.0, max_batch_seconds=8.0, num_workers=2, max_error_rate=1.0
    )
    loader = SpeechLoader(cfg, tok, seed=0)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vocab_size=tok.vocab_size,
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=64,
            moe=MoEConfig(router="dense"),
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen_fillers = 0
    for epoch in (1, 2):
        keys = []
        for batch in loader:
            loss = model.loss(
                model(batch["audio"], batch["audio_lens"]), batch["tokens"], batch["token_lens"]
            )
            assert torch.isfinite(loss.total)
            loss.total.backward()
            opt.step()
            opt.zero_grad()
            keys += batch["keys"]
        # Batches whose every sample was bad become one-utterance silent fillers.
        skipped = loader.skipped()
        fillers = skipped.pop("filler_batches", 0)
        assert sorted(keys) == ["<filler>"] * keys.count("<filler>") + [
            f"train-{i:06d}" for i in range(7)
        ]
        seen_fillers += keys.count("<filler>")
        assert seen_fillers == fillers
        assert skipped == {reason: n * epoch for reason, n in EXPECTED.items()}
    assert fillers > 0  # this plan has some; the model trained through them


def test_counts_split_over_ranks_add_up(salted):
    cfg = DataConfig(
        train=[salted], max_duration=5.0, max_batch_seconds=8.0, num_workers=0, max_error_rate=1.0
    )
    loaders = [SpeechLoader(cfg, rank=r, world_size=2) for r in range(2)]
    steps = [len(list(loader)) for loader in loaders]
    assert steps[0] == steps[1]
    total = Counter()
    for loader in loaders:
        total.update(loader.skipped())
    total.pop("filler_batches", None)
    assert dict(total) == EXPECTED


def test_error_rate_ceiling_names_the_worst_shard(salted):
    cfg = DataConfig(
        train=[salted],
        max_duration=5.0,
        max_batch_seconds=8.0,
        num_workers=0,
        max_error_rate=0.2,
        error_rate_min_samples=5,
    )
    with pytest.raises(
        DataError, match=r"worst shards: .*shard-00000[012]\.tar \(\d+\).*max_error_rate"
    ):
        list(SpeechLoader(cfg, seed=0))


def test_dev_and_eval_reading_of_the_salted_corpus(salted):
    """Dev sets (lenient) skip and count exactly what training skips, in order, over 2 ranks;
    evaluation (strict) refuses the set, naming the first unusable sample's shard and key."""
    from data_pipeline.ordered import OrderedReader
    from data_pipeline.reader import FILLER_KEY

    readers = [OrderedReader(salted, batch_seconds=8.0, strict=False, rank=r, world_size=2)
               for r in range(2)]  # fmt: skip
    batches = [list(reader) for reader in readers]
    assert len(batches[0]) == len(batches[1])
    keys = [k for step in zip(*batches) for b in step for k in b["keys"] if k != FILLER_KEY]
    assert keys == [f"train-{i:06d}" for i in range(7)]
    total = Counter()
    for reader in readers:
        total.update(reader.skipped())
    total.pop("filler_batches", None)
    assert dict(total) == EXPECTED
    with pytest.raises(DataError, match=r"shard-000000\.tar: sample 'garbage' is unusable"):
        OrderedReader(salted)


def test_bad_input_mix_from_a_manifest_keeps_every_good_sample_and_names_every_bad_one(tmp_path):
    """make-shards then one training epoch over a manifest salted with every kind of bad input."""
    from synth_speech import speech_like

    from data_pipeline.shards import REPORT_FILE

    def tone(seconds: float, rate: int, freq: float) -> np.ndarray:
        return 0.4 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)

    good = np.round(speech_like(1.2, 3) * 32767).astype(np.int16)
    sf.write(tmp_path / "good.flac", good, 16000, subtype="PCM_16")
    sf.write(tmp_path / "rate8k.wav", tone(1.0, 8000, 300), 8000, subtype="PCM_16")
    stereo = np.repeat(tone(1.0, 44100, 1000)[:, None], 2, 1)
    sf.write(tmp_path / "stereo44k.wav", stereo, 44100, subtype="PCM_16")
    flac = (tmp_path / "good.flac").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(tmp_path / "whole.wav", good, 16000, subtype="PCM_16")
    (tmp_path / "truncated.wav").write_bytes((tmp_path / "whole.wav").read_bytes()[:20000])
    (tmp_path / "empty.wav").write_bytes(b"")
    nan = tone(0.5, 16000, 440).astype(np.float32)
    nan[10] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    (tmp_path / "notaudio.wav").write_text("this is a text file\n" * 20)
    sf.write(tmp_path / "silence.flac", np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    long = np.round(speech_like(45.0, 4) * 32767).astype(np.int16)
    sf.write(tmp_path / "long45.flac", long, 16000, subtype="PCM_16")
    rows = [
        ("good", "good.flac", "a good one"), ("rate8k", "rate8k.wav", "eight k"),
        ("stereo44k", "stereo44k.wav", "stereo"), ("truncated", "truncated.flac", "cut"),
        ("truncwav", "truncated.wav", "cut wav"),
        ("empty", "empty.wav", "nothing"), ("nan", "nan.wav", "nan"),
        ("notaudio", "notaudio.wav", "text"), ("missing", "missing.flac", "gone"),
        ("notext", "good.flac", ""), ("silence", "silence.flac", "quiet"),
        ("long45", "long45.flac", "forty five seconds"),
    ]  # fmt: skip
    lines = [json.dumps({"audio_filepath": p, "text": t, "key": k}) for k, p, t in rows]
    lines.insert(3, '{"audio_filepath": "good.flac", "text": ')  # a malformed line
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    from omni_ds.cli import main

    assert main(["make-shards", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"),
                 "--workers", "1"]) == 0  # fmt: skip
    report = {r["key"]: (r["reason"], r["error"])
              for r in map(json.loads, (tmp_path / "out" / REPORT_FILE).open())}  # fmt: skip
    assert {k: reason for k, (reason, _) in report.items()} == {
        "line4": "bad_label", "truncated": "unreadable_audio", "truncwav": "truncated_audio",
        "empty": "unreadable_audio",
        "nan": "nonfinite_audio", "notaudio": "unreadable_audio", "missing": "missing_audio",
        "notext": "empty_text", "silence": "silent_audio",
    }  # fmt: skip
    assert report["missing"][1] == f"file not found: {tmp_path / 'missing.flac'}"
    # The good ones, bit-exact or correctly resampled; the 45 s one is kept in the shards.
    cfg = DataConfig(train=[tmp_path / "out"], max_duration=30.0, max_batch_seconds=30.0,
                     num_buckets=1, num_workers=0)  # fmt: skip
    loader = SpeechLoader(cfg)
    got = {k: b["audio"][j, : b["audio_lens"][j]].numpy()
           for b in loader for j, k in enumerate(b["keys"])}  # fmt: skip
    assert sorted(got) == ["good", "rate8k", "stereo44k"]
    assert loader.skipped() == {"too_long": 1}  # the 45 s utterance, by the duration filter
    np.testing.assert_array_equal(np.round(got["good"] * 32768).astype(np.int16), good)
    for key, freq in (("rate8k", 300), ("stereo44k", 1000)):
        assert len(got[key]) == 16000
        middle = slice(400, 15600)  # away from the resampler's edges
        np.testing.assert_allclose(got[key][middle], tone(1.0, 16000, freq)[middle], atol=2e-3)


PLANTED = {"corrupt_audio": 2, "silent_audio": 1, "empty_text": 1}
"""Planted in ``planted``: garbage (refused by the index scan) and a cut-off FLAC (by the reader),
digital silence under a transcript, an empty transcript."""


@pytest.mark.distributed
@pytest.mark.slow
def test_metrics_log_counts_the_planted_skips_by_reason_over_ranks_and_a_resume(tmp_path):
    from harness import run_command

    from omni_ds.train.metrics import read_metrics

    out = tmp_path / "planted"
    out.mkdir()
    flac = good(0)[0][1]
    planted = [
        ("garbage.flac", bytes(range(256)) * 8), ("garbage.json", label("noise")),
        ("cut.flac", flac[: len(flac) // 2]), ("cut.json", label("cut off")),
        ("quiet.flac", audio_bytes(np.zeros(16000, np.int16))), ("quiet.json", label("quiet")),
        ("blank.flac", flac), ("blank.json", label("")),
    ]  # fmt: skip
    members = [m for i in range(8) for m in good(i)]
    write_tar(out / "shard-000000.tar", members[:8] + planted + members[8:])
    train_tokenizer([out], tmp_path / "tok", 64)
    cfg = DataConfig(train=[out], max_duration=5.0, max_batch_seconds=6.0, num_workers=0)
    epoch = len(SpeechLoader(cfg, rank=0, world_size=2))
    assert epoch >= 2
    options = [
        f"train.run_dir={tmp_path / 'run'}", f"data.train=[{out}]", "data.dev={}",
        f"data.tokenizer={tmp_path / 'tok.model'}", "data.max_duration=5", "data.max_batch_seconds=6",
        "data.num_workers=0", "deepspeed=ds_configs/zero1_fp32.json", "model.n_layers=1",
        "train.log_every=1", "train.progress_bar=false", "checkpoint.every_steps=1",
    ]  # fmt: skip
    argv = ["omni-ds", "train", "configs/tiny.yaml", *[a for o in options for a in ("--set", o)]]
    # One step, then a resume to the end of the epoch: the counts continue from the checkpoint.
    run_command([*argv, "--set", "train.max_steps=1"], 2)
    (rank0, _) = run_command([*argv, "--set", f"train.max_steps={epoch}", "--resume", "auto"], 2)
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == epoch
    skipped = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("skipped/")}
    bookkeeping = {"filler_batches", "rank_remainder"}
    assert {k: v for k, v in skipped.items() if k not in bookkeeping} == PLANTED
    assert f"skipped {sum(skipped.values())}" in rank0.stderr
