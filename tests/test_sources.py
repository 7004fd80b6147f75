"""Shard sources (data_pipeline.sources): shards written by the real webdataset library, named as
directories, tars, brace patterns and globs, labelled by .json or .txt, indexed on first use."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.config import DataConfig
from data_pipeline.loader import DataError, SpeechLoader
from data_pipeline.ordered import OrderedReader
from data_pipeline.sources import SourceError, cache_dir, expand, index_location, open_shards
from data_pipeline.tokenizer import Tokenizer
from omni_ds.cli import main


def flac(seconds: float, seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    pcm = np.round(rng.normal(0, 0.1, int(seconds * 16000)).clip(-1, 1) * 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), pcm


def write_wds(out: Path, n: int, label: str = "json", per_shard: int = 3, text_key="text",
              first: int = 0):  # fmt: skip
    """``n`` samples (``first`` on) in ``out/shard-%06d.tar`` by webdataset.ShardWriter;
    returns key -> pcm."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    audio = {}
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(first, first + n):
            data, pcm = flac(0.5 + 0.1 * i, i)
            key = f"utt{i:03d}"
            audio[key] = pcm
            text = f"word {i}"
            sample = {"__key__": key, "flac": data}
            sample[label] = {text_key: text} if label == "json" else text
            sink.write(sample)
    return audio


def keys(shard_set) -> list[str]:
    return [row[0] for s in shard_set.shards for row in s["samples"]]


def test_brace_glob_tar_and_directory_name_the_same_shards(tmp_path):
    write_wds(tmp_path / "wds", 10)  # 4 shards: 3 + 3 + 3 + 1
    d = tmp_path / "wds"
    brace = f"{d}/shard-{{000000..000003}}.tar"
    assert expand(brace) == expand(d) == expand(f"{d}/*.tar") == sorted(d.glob("*.tar"))
    assert expand(d / "shard-000002.tar") == [d / "shard-000002.tar"]
    # A directory source gets its own index.json; a pattern an index in the cache.
    assert keys(open_shards(d)) == [f"utt{i:03d}" for i in range(10)]
    assert (d / "index.json").is_file()
    sub = open_shards(f"{d}/shard-{{000001..000002}}.tar")
    assert keys(sub) == [f"utt{i:03d}" for i in range(3, 9)]
    assert index_location(f"{d}/shard-{{000001..000002}}.tar").parent == cache_dir()
    # eval/analyze (the ordered reader) and train-tokenizer take the same forms.
    reader = OrderedReader(f"{d}/shard-{{000001..000002}}.tar", batch_seconds=100.0)
    assert [k for b in reader for k in b["keys"]] == [f"utt{i:03d}" for i in range(3, 9)]
    assert main(["train-tokenizer", f"{d}/*.tar", "--vocab", "24", "--out", str(d / "sp")]) == 0
    assert Tokenizer(d / "sp.model").decode(Tokenizer(d / "sp.model").encode("Word 7")) == "word 7"
    with pytest.raises(SourceError, match=r"2 of the 6 shards it expands to do not exist .*"
                                          r"shard-000004\.tar\); check the pattern"):  # fmt: skip
        expand(f"{d}/shard-{{000000..000005}}.tar")
    # A shard added later is indexed: the directory's index is rebuilt, the pattern's re-keyed.
    write_wds(tmp_path / "more", 2)
    (tmp_path / "more" / "shard-000000.tar").rename(d / "shard-000004.tar")
    assert open_shards(d).num_samples == open_shards(f"{d}/*.tar").num_samples == 12
    # Shards of several folders: named relative to their common folder, indexed once.
    write_wds(tmp_path / "other", 2)
    two = f"{tmp_path}/*/shard-000000.tar"
    assert open_shards(two).num_samples == 5
    built = index_location(two).stat().st_mtime_ns
    names = [s["name"] for s in open_shards(two).shards]
    assert names == ["other/shard-000000.tar", "wds/shard-000000.tar"]
    assert index_location(two).stat().st_mtime_ns == built
    # A shard rewritten in place under its name: `make-shards --index-only` re-indexes.
    write_wds(tmp_path / "one", 1)
    (tmp_path / "one" / "shard-000000.tar").replace(d / "shard-000004.tar")
    assert main(["make-shards", str(d), "--index-only"]) == 0
    assert open_shards(d).num_samples == 11
    with pytest.raises(SourceError, match="no .tar file matches"):
        expand(f"{d}/nope-*.tar")
    with pytest.raises(SourceError, match="does not exist; name a shard directory"):
        expand(tmp_path / "missing")


def test_txt_labels_bit_exact_and_an_index_kept_out_of_the_folder(tmp_path):
    audio = write_wds(tmp_path / "wds", 4, label="txt")
    d = tmp_path / "wds"
    # beside=False (evaluation; also what a read-only folder gets): the index goes to the cache.
    shard_set = open_shards(d, beside=False)
    assert not (d / "index.json").exists() and keys(shard_set) == list(audio)
    assert index_location(d, beside=False).parent == cache_dir()
    cfg = DataConfig(train=[str(d)], num_workers=0, max_batch_seconds=30.0, num_buckets=1)
    batches = list(SpeechLoader(cfg))
    got = {k: (b["audio"][j], b["texts"][j]) for b in batches for j, k in enumerate(b["keys"])}
    assert sorted(got) == list(audio)
    for key, pcm in audio.items():
        np.testing.assert_array_equal(got[key][0][: len(pcm)].numpy() * 32768, pcm)
        assert got[key][1] == f"word {int(key[3:])}"


def test_text_key_and_the_index_only_command(tmp_path, capsys):
    write_wds(tmp_path / "wds", 4, text_key="transcript")
    spec = f"{tmp_path}/wds/shard-{{000000..000001}}.tar"
    # The default key finds no transcript: every sample is unusable and the command says so.
    assert main(["make-shards", spec, "--index-only"]) == 1
    out, err = capsys.readouterr()
    assert "4 unusable {'bad_label': 4}" in out and "--text-key" in err
    assert main(["make-shards", spec, "--index-only", "--text-key", "transcript"]) == 0
    assert "2 shards, 4 samples" in capsys.readouterr().out
    cfg = DataConfig(train=[spec], text_key="transcript", num_workers=0, num_buckets=1)
    assert sorted(k for b in SpeechLoader(cfg) for k in b["keys"]) == [
        f"utt{i:03d}" for i in range(4)
    ]
    with pytest.raises(DataError, match=r"no usable sample \(4 left out: \{'bad_label': 4\}\)"):
        SpeechLoader(DataConfig(train=[spec], num_workers=0))


def test_ranks_indexing_at_once_build_one_index(tmp_path):
    """Two processes open the same unindexed source together: one builds, both read it."""
    import multiprocessing

    write_wds(tmp_path / "wds", 6)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map(_count, [str(tmp_path / "wds")] * 2)
    assert got == [6, 6]
    assert json.loads((tmp_path / "wds" / "index.json").read_text())["shards"]
    assert not list((tmp_path / "wds").glob("*.tmp"))


def _count(spec: str) -> int:
    return open_shards(spec, progress=False).num_samples


@pytest.mark.slow
@pytest.mark.distributed
def test_webdataset_shards_train_on_two_ranks_as_they_are(tmp_path):
    """webdataset.ShardWriter shards, json and txt labels, brace-named, no index and no omni-ds
    preparation: `omni-ds train` indexes them itself and trains 3 steps on 2 ranks."""
    import sentencepiece as spm
    import webdataset as wds
    from harness import run_command

    from data_pipeline.synth import splits, utterance
    from omni_ds.train.metrics import read_metrics

    split, texts = splits(120)[0], []
    for label, first in (("json", 0), ("txt", 24)):
        pattern = str(tmp_path / f"{label}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=8, verbose=0) as sink:
            for i in range(first, first + 24):
                key, pcm, meta = utterance(split, i, 0, 0.0)
                buf = io.BytesIO()
                sf.write(buf, pcm, 16000, format="FLAC", subtype="PCM_16")
                text = {"text": meta["text"]} if label == "json" else meta["text"]
                sink.write({"__key__": key, "flac": buf.getvalue(), label: text})
                texts.append(meta["text"])
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, hard_vocab_limit=False, bos_id=-1, eos_id=-1,
                                   minloglevel=2)  # fmt: skip
    run = tmp_path / "run"
    options = [
        f"train.run_dir={run}",
        f"data.train=['{tmp_path}/json-{{000000..000002}}.tar', '{tmp_path}/txt-{{000000..000002}}.tar']",
        f"data.dev={{dev: '{tmp_path}/txt-000002.tar'}}",
        f"data.tokenizer={tmp_path}/sp.model",
        "data.max_batch_seconds=12", "data.max_duration=10", "data.num_workers=0", "deepspeed=ds_configs/zero1_fp32.json",
        "model.moe.ep_size=2", "train.max_steps=3", "train.log_every=1", "train.dev_every=3",
        "train.progress_bar=false",
    ]  # fmt: skip
    argv = ["omni-ds", "train", "configs/tiny.yaml", *[a for o in options for a in ("--set", o)]]
    ranks = run_command(argv, 2)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)
    (dev,) = read_metrics(run, kind="dev/dev")
    assert dev["utterances"] == 8 and dev["skipped"] == 0
    assert "index " in ranks[0].stderr + ranks[1].stderr  # built once, with progress lines
    for label in ("json", "txt"):  # ... by train itself, every sample usable
        spec = f"{tmp_path}/{label}-{{000000..000002}}.tar"
        assert index_location(spec).is_file()
        shard_set = open_shards(spec)
        assert shard_set.num_samples == 24 and not any(s["bad"] for s in shard_set.shards)
