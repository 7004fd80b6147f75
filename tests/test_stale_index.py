"""A shard rewritten in place after it was indexed: an index omni-ds built itself is re-indexed
(only the changed shards), and reading sees the new samples; a user's index is refused by the
loader and by check-config, naming the shard, the sizes and the fix."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_sources import write_wds
from test_user_data import lowercase_tokenizer

from data_pipeline.config import DataConfig
from data_pipeline.index import StaleIndexError, index_directory
from data_pipeline.loader import SpeechLoader
from data_pipeline.sources import open_shards
from omni_ds.cli import main

REPO = Path(__file__).resolve().parents[1]


def reverse_samples(path: Path) -> None:
    """Rewrite a shard with its samples in reverse order: the same bytes and size, other offsets
    (an index's old offsets would pair one sample's audio with another's label)."""
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    # A sample's bytes: from its first member's header to the end of its last member's data.
    starts = [m.offset for m in members[::2]]
    end = -(-(members[-1].offset_data + members[-1].size) // 512) * 512
    chunks = [data[a:b] for a, b in zip(starts, [*starts[1:], end])]
    size = len(data)
    path.write_bytes(data[: starts[0]] + b"".join(reversed(chunks)) + data[end:])
    assert path.stat().st_size == size
    later(path)


def later(path: Path) -> None:
    """A rewrite a while after indexing (a test rewrites within one timestamp tick)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def read_all(spec) -> dict[str, tuple[np.ndarray, str]]:
    cfg = DataConfig(train=[str(spec)], num_workers=0, max_batch_seconds=30.0, num_buckets=1)
    return {k: (b["audio"][j, : b["audio_lens"][j]].numpy(), b["texts"][j])
            for b in SpeechLoader(cfg) for j, k in enumerate(b["keys"])}  # fmt: skip


def assert_reads(spec, audio: dict[str, np.ndarray]) -> None:
    got = read_all(spec)
    assert sorted(got) == sorted(audio)
    for key, pcm in audio.items():
        np.testing.assert_array_equal(np.round(got[key][0] * 32768), pcm)
        assert got[key][1] == f"word {int(key[3:])}"


def test_an_automatic_index_re_indexes_only_the_changed_shards(tmp_path, capsys):
    d = tmp_path / "wds"
    audio = write_wds(d, 9)  # 3 shards of 3
    built = open_shards(d)
    assert json.loads((d / "index.json").read_text())["auto"] is True
    # Same size, other offsets; and a shard regenerated with other samples (another size).
    reverse_samples(d / "shard-000001.tar")
    new = write_wds(tmp_path / "new", 4, per_shard=4, first=20)
    (tmp_path / "new" / "shard-000000.tar").replace(d / "shard-000002.tar")
    audio = {k: v for k, v in audio.items() if int(k[3:]) < 6} | new
    capsys.readouterr()
    assert_reads(d, audio)
    err = capsys.readouterr().err
    assert "index.json: 2 of 3 shards changed since they were indexed, re-indexing them: " in err
    assert "shard-000001.tar (was rewritten after it was indexed (same " in err
    assert "shard-000002.tar (is " in err
    assert "index wds: 2/2 shard" in err  # only those two scanned
    assert open_shards(d).shards[0] == built.shards[0]
    # A pattern's index (in the cache) is re-indexed the same way.
    spec = f"{d}/shard-{{000001..000002}}.tar"
    assert_reads(spec, {k: v for k, v in audio.items() if int(k[3:]) >= 3})
    reverse_samples(d / "shard-000002.tar")
    assert_reads(spec, {k: v for k, v in audio.items() if int(k[3:]) >= 3})


def test_a_stale_user_index_is_refused_by_the_loader_and_check_config(tmp_path, capsys):
    d = tmp_path / "wds"
    audio = write_wds(d, 6)
    index_directory(d)  # what make-shards writes
    # A shard copied or touched (newer, same content) is fine.
    later(d / "shard-000000.tar")
    assert_reads(d, audio)
    shard = d / "shard-000001.tar"
    recorded = shard.stat().st_size
    more = write_wds(tmp_path / "more", 4, per_shard=4, first=3)
    (tmp_path / "more" / "shard-000000.tar").replace(shard)
    fix = f"Re-index with `omni-ds make-shards --index-only {d}`"
    message = (f"{d / 'index.json'} is stale: shard shard-000001.tar is {shard.stat().st_size} "
               f"bytes, the index says {recorded}; its offsets would pair the wrong audio and "
               f"labels. {fix}")  # fmt: skip
    with pytest.raises(StaleIndexError) as e:
        read_all(d)
    assert str(e.value) == message

    lowercase_tokenizer(tmp_path / "tok", [f"word {i}" for i in range(10)] * 3, vocab=20)
    options = [f"data.train=[{d}]", "data.dev={}", f"data.tokenizer={tmp_path / 'tok.model'}",
               f"deepspeed={REPO}/ds_configs/zero1_fp32.json", f"train.run_dir={tmp_path / 'run'}"]  # fmt: skip
    argv = ["check-config", str(REPO / "configs/tiny.yaml")]
    capsys.readouterr()
    assert main([*argv, *[a for o in options for a in ("--set", o)]]) == 2
    assert f"data.train[0]: {message}" in capsys.readouterr().out

    assert main(["make-shards", str(d), "--index-only"]) == 0
    reverse_samples(d / "shard-000000.tar")  # same size: found by the tar headers' spot check
    with pytest.raises(StaleIndexError, match=r"shard-000000\.tar was rewritten after it was "
                                              r"indexed \(same \d+ bytes, members moved\)"):  # fmt: skip
        read_all(d)
    assert main(["make-shards", str(d), "--index-only"]) == 0
    assert_reads(d, {k: v for k, v in audio.items() if int(k[3:]) < 3} | more)


def test_a_copied_shard_with_long_member_names_passes_the_header_check(tmp_path):
    """Keys over the tar header's 100 bytes (a GNU/pax record holds the name): a touched shard
    still passes; only a moved member fails."""
    import io

    import soundfile as sf

    from data_pipeline.index import load_index

    d = tmp_path / "wds"
    d.mkdir()
    with tarfile.open(d / "shard-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            key = f"{'speaker_' * 15}{i}"  # 121 characters
            buf = io.BytesIO()
            sf.write(buf, np.full(1600, 0.1 * (i + 1)), 16000, format="FLAC", subtype="PCM_16")
            for ext, data in (("flac", buf.getvalue()), ("txt", f"word {i}".encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    index_directory(d)
    later(d / "shard-000000.tar")
    assert load_index(d).num_samples == 3
