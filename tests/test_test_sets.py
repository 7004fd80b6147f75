"""The ordered reader of dev and test sets (``data_pipeline.ordered``) on real audio: tar shards
with or without an index, every audio format the index knows, JSONL manifests; every utterance
once, in order, over any number of ranks; strict evaluation names what it cannot read; dev sets
during training are read in order, unfiltered, and their fillers stay out of the scores."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from test_bad_data import write_tar
from test_loader import all_keys, write_corpus

from data_pipeline.config import DataConfig
from data_pipeline.loader import SpeechLoader
from data_pipeline.ordered import OrderedReader
from data_pipeline.reader import FILLER_KEY, DataError
from data_pipeline.synth import splits
from data_pipeline.tokenizer import Tokenizer
from omni_ds.eval.wer import score_set
from omni_ds.model.decode import ctc_greedy


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encoded(audio: np.ndarray, ext: str) -> bytes:
    fmt, subtype = {
        "flac": ("FLAC", "PCM_16"),
        "wav": ("WAV", "PCM_16"),
        "ogg": ("OGG", "VORBIS"),
        "opus": ("OGG", "OPUS"),
        "mp3": ("MP3", "MPEG_LAYER_III"),
    }[ext]
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format=fmt, subtype=subtype)
    return buf.getvalue()


def write_shard(path: Path, items, ext: str = "flac") -> None:
    members = []
    for key, audio, text in items:
        members += [(f"{key}.{ext}", encoded(audio, ext)),
                    (f"{key}.json", json.dumps({"text": text}).encode())]  # fmt: skip
    write_tar(path, members)


def test_shard_dir_without_index_reads_every_utterance_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(
        shards / "shard-000001.tar",
        [("b1", tone(0.5, 16000), "two"), ("b2", tone(0.25, 16000), "three")],
    )
    write_shard(shards / "shard-000000.tar", [("a1", tone(1.0, 16000), "One, two!")])
    (whole,) = OrderedReader(shards)
    assert whole["keys"] == ["a1", "b1", "b2"]
    assert whole["texts"] == ["One, two!", "two", "three"]  # references untouched
    assert whole["audio_lens"].tolist() == [16000, 8000, 4000]
    np.testing.assert_allclose(whole["audio"][0].numpy(), tone(1.0, 16000), atol=1e-4)
    # 1.0 s budget: [a1] alone (1 s); then b1 + b2 (2 x 0.5 s)
    reader = OrderedReader(shards, batch_seconds=1.0)
    assert reader.num_utterances == 3
    batches = list(reader)
    assert [b["keys"] for b in batches] == [["a1"], ["b1", "b2"]]
    assert batches[1]["audio"].shape == (2, 8000)
    assert batches[1]["audio_lens"].tolist() == [8000, 4000]
    assert batches[1]["audio"][1, 4000:].abs().max() == 0
    assert [b["keys"] for b in reader] == [["a1"], ["b1", "b2"]]  # every pass the same
    # The scan stayed in memory: nothing was written into the user's directory.
    assert sorted(p.name for p in shards.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]


@pytest.mark.parametrize("ext", ["ogg", "opus", "mp3", "wav"])
def test_every_indexed_audio_format_is_evaluated(tmp_path, ext):
    items = [("u0", tone(0.5, 16000), "a"), ("u1", tone(1.0, 16000), "b")]
    write_shard(tmp_path / "one.tar", items, ext)
    (batch,) = OrderedReader(tmp_path / "one.tar")
    assert batch["keys"] == ["u0", "u1"] and batch["texts"] == ["a", "b"]
    for row, seconds in enumerate((0.5, 1.0)):
        n = int(batch["audio_lens"][row])
        assert abs(n - seconds * 16000) <= 0.05 * 16000
        assert float(batch["audio"][row, :n].abs().max()) > 0.1


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
    reader = OrderedReader(manifest)
    assert reader.num_utterances == 2
    (batch,) = reader
    assert batch["texts"] == ["x", "y"] and batch["keys"] == ["x", "y_00000500"]
    assert batch["audio_lens"].tolist() == [16000, 16000] and batch["audio"].dtype == torch.float32
    # a 200 Hz tone stays a 200 Hz tone after 8 -> 16 kHz
    spectrum = np.abs(np.fft.rfft(batch["audio"][0].numpy()))
    assert np.argmax(spectrum) == pytest.approx(200, abs=1)
    # the 0.5-1.5 s segment
    np.testing.assert_allclose(batch["audio"][1].numpy(), tone(2.0, 16000)[8000:24000], atol=1e-4)


def test_bad_paths_and_unusable_samples_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\*\.tar shards"):
        OrderedReader(tmp_path)
    flac = encoded(tone(0.5, 16000), "flac")
    members = [("a.flac", flac), ("a.json", b'{"text": "a"}'),
               ("cut.flac", flac[: len(flac) // 2]), ("cut.json", b'{"text": "cut"}')]  # fmt: skip
    write_tar(tmp_path / "s.tar", members)
    # The header of a truncated FLAC parses; decoding it fails, naming shard and key.
    with pytest.raises(DataError, match=r"s\.tar: sample 'cut' is unusable \(corrupt_audio"):
        list(OrderedReader(tmp_path / "s.tar"))
    write_tar(tmp_path / "s.tar", [*members, ("orphan.flac", flac)])
    with pytest.raises(DataError, match=r"s\.tar: sample 'orphan' is unusable \(corrupt_member"):
        OrderedReader(tmp_path / "s.tar")
    # Leniently (dev sets): both skipped and counted, the rest read.
    reader = OrderedReader(tmp_path / "s.tar", strict=False)
    assert [k for b in reader for k in b["keys"]] == ["a"]
    assert reader.skipped() == {"corrupt_audio": 1, "corrupt_member": 1}
    sf.write(tmp_path / "gone.flac", tone(0.5, 16000), 16000)
    (tmp_path / "m.jsonl").write_text('{"audio_filepath": "gone.flac", "text": "t"}\n')
    reader = OrderedReader(tmp_path / "m.jsonl")
    (tmp_path / "gone.flac").unlink()
    with pytest.raises(
        DataError, match=r"gone\.flac: sample 'gone' is unusable \(missing_audio: file not found: "
    ):
        list(reader)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """23 synthetic dev utterances in 3 indexed shards, plus a tokenizer."""
    return write_corpus(tmp_path_factory.mktemp("dev"), (9, 8, 6), splits(120)[1], 0.0, 40)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_ranks_cover_every_utterance_exactly_once(corpus, world):
    ranks = [OrderedReader(corpus, batch_seconds=6.0, strict=False, rank=r, world_size=world)
             for r in range(world)]  # fmt: skip
    steps = {len(r) for r in ranks}
    assert len(steps) == 1  # the same number of forwards on every rank
    per_rank = [[b["keys"] for b in r] for r in ranks]
    # Rank r took batches r, r+W, ...: interleaved back, they are the set in file order.
    merged = [k for step in range(steps.pop()) for r in per_rank for k in r[step]]
    assert [k for k in merged if k != FILLER_KEY] == all_keys(corpus)
    plan = OrderedReader(corpus, batch_seconds=6.0)
    assert merged.count(FILLER_KEY) == -len(plan) % world
    assert all(r.skipped() == {} for r in ranks)


def test_reading_never_draws_from_the_global_rngs(corpus):
    reader = OrderedReader(corpus, batch_seconds=6.0, num_workers=2)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert sum(len(b["keys"]) for b in reader) == 23
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


class Engine:
    """What ``dev_scores`` uses of a DeepSpeed engine, around a real model."""

    def __init__(self, model):
        self.module = model

    def __call__(self, audio, lens):
        return self.module(audio, lens)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


def test_dev_sets_in_training_are_ordered_unfiltered_and_fillers_stay_out(corpus):
    from omni_ds.config.model import ModelConfig, MoEConfig
    from omni_ds.model.encoder import build_model
    from omni_ds.train.data import make_dev_sets
    from omni_ds.train.dev_eval import dev_scores

    # Filters that drop most of the set from training: none of them applies to a dev set.
    data = DataConfig(train=[corpus], dev={"dev": corpus}, min_duration=1.5, max_duration=2.5,
                      max_chars_per_second=8.0, max_batch_seconds=7.0, num_workers=0)  # fmt: skip
    trained = list(SpeechLoader(data))
    assert sum(len(b["keys"]) for b in trained) < 23
    tok = Tokenizer(corpus / "tokenizer.model")
    cfg = SimpleNamespace(data=data)
    ranks = [make_dev_sets(cfg, r, 2, tok)["dev"] for r in range(2)]
    batches = [list(r) for r in ranks]
    assert len(batches[0]) == len(batches[1])
    merged = [k for step in zip(*batches) for b in step for k in b["keys"]]
    assert [k for k in merged if k != FILLER_KEY] == all_keys(corpus)
    assert batches[1][-1]["keys"] == [FILLER_KEY]  # an odd batch count: rank 1 is padded

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                    d_ff=64, moe=MoEConfig(router="dense")))  # fmt: skip
    scores = dev_scores(Engine(model), {"dev": ranks[1]}, tok)["dev"]
    real = [b for b in batches[1] if b["keys"] != [FILLER_KEY]]
    assert scores["utterances"] == sum(len(b["keys"]) for b in real) and scores["skipped"] == 0
    model.eval()
    with torch.no_grad():
        hyps = [tok.decode([i for i in ids if i < tok.vocab_size])
                for b in real for ids in ctc_greedy(*_logits(model, b))]  # fmt: skip
    assert scores["wer"] == score_set([t for b in real for t in b["texts"]], hyps).wer
    (one,) = make_dev_sets(cfg, 0, 1, tok).values()
    assert dev_scores(Engine(model), {"dev": one}, tok)["dev"]["utterances"] == 23


def _logits(model, batch):
    out = model(batch["audio"], batch["audio_lens"])
    return out.logits.float(), out.out_lens
