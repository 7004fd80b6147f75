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
    index_directory(out)
    train_tokenizer([out], out / "tokenizer", 64)
    # After indexing: the last member of shard 1 is cut short and shard 2 disappears.
    cut = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(cut[: cut.rindex(b"train-000007.json") + 520])
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
