"""make-shards: every input format round-trips bit-exactly; output is deterministic and resumable."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from synth_speech import speech_like

from data_pipeline.index import index_directory, load_index
from data_pipeline.manifests import read_input
from data_pipeline.shards import REPORT_FILE, make_shards
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from omni_ds.cli import main


def pcm(seconds: float, seed: int) -> np.ndarray:
    return np.round(speech_like(seconds, seed) * 32767).astype(np.int16)


def read_shards(directory: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every sample of a shard dir, decoded with tarfile + soundfile only (not our reader)."""
    out = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".flac"):
                key = name[: -len(".flac")]
                audio, rate = sf.read(io.BytesIO(data), dtype="int16")
                assert rate == 16000 and audio.ndim == 1
                out[key] = (audio, json.loads(members[f"{key}.json"]))
    return out


def report(directory: Path) -> dict[str, str]:
    lines = (directory / REPORT_FILE).read_text().splitlines()
    return {row["key"]: row["reason"] for row in map(json.loads, lines)}


def test_nemo_manifest_round_trip(tmp_path):
    audio = {f"utt{i}": pcm(0.4 + 0.15 * i, i) for i in range(7)}
    lines = []
    for i, (key, x) in enumerate(audio.items()):
        sf.write(tmp_path / f"{key}.flac", x, 16000, subtype="PCM_16")
        row = {"audio_filepath": f"{key}.flac", "text": f"words {i}", "duration": len(x) / 16000}
        row.update(pl_confidence=0.5 + i / 20, pl_teacher="big-model", lang="en")
        lines.append(json.dumps(row))
    # A segment of a longer file (offset + duration), a missing file and an empty transcript.
    long = pcm(2.0, 99)
    sf.write(tmp_path / "long.flac", long, 16000, subtype="PCM_16")
    lines.append(
        json.dumps({"audio_filepath": "long.flac", "text": "cut", "offset": 0.5, "duration": 0.75})
    )
    lines.append(json.dumps({"audio_filepath": "gone.flac", "text": "lost", "duration": 1.0}))
    lines.append(json.dumps({"audio_filepath": "utt0.flac", "text": " ", "key": "blank"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")

    records, problems = read_input(tmp_path / "m.jsonl")
    summary = make_shards(records, tmp_path / "out", problems=problems, shard_size=3, workers=2)
    assert (summary.shards, summary.samples, summary.problems) == (4, 8, 2)
    got = read_shards(tmp_path / "out")
    for i, (key, x) in enumerate(audio.items()):
        np.testing.assert_array_equal(got[key][0], x)
        label = got[key][1]
        assert label["text"] == f"words {i}" and label["pl_teacher"] == "big-model"
        assert label["pl_confidence"] == 0.5 + i / 20 and label["lang"] == "en"
        assert label["sample_rate"] == 16000 and label["duration"] == round(len(x) / 16000, 4)
    np.testing.assert_array_equal(got["long_00000500"][0], long[8000:20000])
    assert report(tmp_path / "out") == {"gone": "missing_audio", "blank": "empty_text"}
    errors = [json.loads(line)["error"] for line in (tmp_path / "out" / REPORT_FILE).open()]
    assert f"file not found: {tmp_path / 'gone.flac'}" in errors
    index = load_index(tmp_path / "out")
    assert index.num_samples == 8 and [s["num_samples"] for s in index.shards] == [3, 3, 2, 0]


def test_librispeech_tree_round_trip(tmp_path):
    expected = {}
    for spk, chapter in ((19, 198), (26, 495)):
        folder = tmp_path / "ls" / str(spk) / str(chapter)
        folder.mkdir(parents=True)
        lines = []
        for u in range(3):
            key = f"{spk}-{chapter}-{u:04d}"
            expected[key] = (pcm(0.5 + 0.2 * u, spk + u), f"SOME WORDS {u}")
            sf.write(folder / f"{key}.flac", expected[key][0], 16000, subtype="PCM_16")
            lines.append(f"{key} SOME WORDS {u}")
        (folder / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    assert (
        main(
            ["make-shards", str(tmp_path / "ls"), "--out", str(tmp_path / "out"), "--workers", "1"]
        )
        == 0
    )
    got = read_shards(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for key, (x, text) in expected.items():
        np.testing.assert_array_equal(got[key][0], x)
        assert got[key][1]["text"] == text


def test_kaldi_dir_round_trip_with_segments_and_resampling(tmp_path):
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    rec_a, rec_b = pcm(3.0, 1), pcm(1.0, 2)
    sf.write(kaldi / "a.wav", rec_a, 16000, subtype="PCM_16")
    # 8 kHz stereo float input: mixed down and resampled to 16 kHz.
    sf.write(kaldi / "b.wav", np.stack([rec_b[::2], rec_b[::2]], 1) / 32768, 8000, subtype="FLOAT")
    (kaldi / "wav.scp").write_text("recA a.wav\nrecB b.wav\nrecC sox c.wav -t wav - |\n")
    (kaldi / "segments").write_text("a1 recA 0.0 1.25\na2 recA 1.25 3.0\nc1 recC 0 1\n")
    (kaldi / "text").write_text("a1 first part\na2 second part\nrecB whole file\nc1 piped\n")
    (kaldi / "utt2spk").write_text("a1 spkA\na2 spkA\nrecB spkB\nc1 spkC\n")
    records, problems = read_input(kaldi)
    make_shards(records, tmp_path / "out", problems=problems, workers=1, progress=False)
    got = read_shards(tmp_path / "out")
    np.testing.assert_array_equal(got["a1"][0], rec_a[:20000])
    np.testing.assert_array_equal(got["a2"][0], rec_a[20000:])
    assert got["a2"][1] == {
        "text": "second part",
        "speaker": "spkA",
        "duration": 1.75,
        "sample_rate": 16000,
    }
    assert len(got["recB"][0]) == 16000 and got["recB"][1]["speaker"] == "spkB"
    assert report(tmp_path / "out") == {"c1": "unreadable_audio"}


def audio_manifest(tmp_path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        sf.write(tmp_path / f"u{i}.flac", pcm(0.3 + 0.05 * i, i), 16000, subtype="PCM_16")
        lines.append(json.dumps({"audio_filepath": f"u{i}.flac", "text": f"t {i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    return tmp_path / "m.jsonl"


def test_deterministic_resumable_and_indexable(tmp_path):
    records, _ = read_input(audio_manifest(tmp_path, 10))
    one = make_shards(records, tmp_path / "one", shard_bytes=30_000, workers=1, progress=False)
    two = make_shards(records, tmp_path / "two", shard_bytes=30_000, workers=2, progress=False)
    assert one.shards == two.shards > 2
    digests = [s["sha256"] for s in load_index(tmp_path / "one").shards]
    assert digests == [s["sha256"] for s in load_index(tmp_path / "two").shards]
    for a, b in zip(
        sorted((tmp_path / "one").glob("*.tar")), sorted((tmp_path / "two").glob("*.tar"))
    ):
        assert a.read_bytes() == b.read_bytes()
    # A rerun writes nothing; a lost shard is rewritten identically.
    assert make_shards(records, tmp_path / "one", shard_bytes=30_000, progress=False).written == 0
    (tmp_path / "one" / "shard-000001.tar").unlink()
    assert make_shards(records, tmp_path / "one", shard_bytes=30_000, progress=False).written == 1
    assert [s["sha256"] for s in load_index(tmp_path / "one").shards] == digests
    # Indexing the shards from scratch (as for shards written by other tools) gives the same index.
    written = (tmp_path / "two" / "index.json").read_text()
    index_directory(tmp_path / "two")
    assert (tmp_path / "two" / "index.json").read_text() == written


def test_tokenizer_from_shard_transcripts(tmp_path):
    records, _ = read_input(audio_manifest(tmp_path, 6))
    make_shards(records, tmp_path / "out", workers=1, progress=False)
    assert main(["train-tokenizer", str(tmp_path / "out"), "--vocab", "20"]) == 0
    tok = Tokenizer(tmp_path / "out" / "tokenizer.model")
    assert 5 < tok.vocab_size <= 20
    ids = tok.encode("t 3")
    assert ids and tok.decode(ids) == "t 3"
    assert pickle.loads(pickle.dumps(tok)).encode("t 5") == tok.encode("t 5")
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        Tokenizer(tmp_path / "none.model")
    with pytest.raises(ValueError, match="no transcripts"):
        (tmp_path / "empty").mkdir()
        make_shards([], tmp_path / "empty", progress=False)
        train_tokenizer([tmp_path / "empty"], tmp_path / "x", 10)


def test_shards_read_by_the_webdataset_library(tmp_path):
    import webdataset as wds

    records, _ = read_input(audio_manifest(tmp_path, 4))
    make_shards(records, tmp_path / "out", shard_size=2, workers=1, progress=False)
    urls = [str(p) for p in sorted((tmp_path / "out").glob("*.tar"))]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(got) == [f"u{i}" for i in range(4)]
    audio, rate = sf.read(io.BytesIO(got["u2"]["flac"]), dtype="int16")
    np.testing.assert_array_equal(audio, pcm(0.4, 2))
    assert json.loads(got["u2"]["json"])["text"] == "t 2"


def file_tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_array_tasks_write_what_the_local_command_writes(tmp_path, monkeypatch, capsys):
    manifest = audio_manifest(tmp_path, 9)
    with manifest.open("a") as f:
        f.write("\n" + json.dumps({"audio_filepath": "missing.flac", "text": "gone"}))
    local, array = tmp_path / "local", tmp_path / "array"
    common = [str(manifest), "--shard-size", "2", "--workers", "1"]
    assert main(["make-shards", *common, "--out", str(local)]) == 0
    # Task 1 of 3 by flags; tasks 2 and 0 from the SLURM array variables, as sbatch sets them.
    assert main(["make-shards", *common, "--out", str(array), "--task", "1", "--tasks", "3",
                 "--job", "77"]) == 0  # fmt: skip
    assert "task 1 of 3 done; waiting for the other tasks" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    for task_id in (6, 4):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
        assert main(["make-shards", *common, "--out", str(array)]) == 0
    assert "task 0 of 3 done; all tasks done, index written" in capsys.readouterr().out
    written = file_tree(local)
    assert sum(name.endswith(".tar") for name in written) == 5
    assert "missing.flac" in written["report.jsonl"].decode()
    got = file_tree(array)
    assert {k: got[k] for k in written} == written
    assert sorted(set(got) - set(written)) == [".array/77.0-of-3", ".array/77.1-of-3",
                                               ".array/77.2-of-3", ".array/lock"]  # fmt: skip
    capsys.readouterr()
    assert main(["make-shards", *common, "--out", str(array), "--task", "3", "--tasks", "3"]) == 2
    assert "--task 3 is not in 0..2" in capsys.readouterr().err


def test_the_sbatch_script_runs_make_shards_tasks(tmp_path):
    """slurm/make_shards.sbatch as SLURM starts it on each array task (no cluster needed)."""
    import os
    import subprocess
    import sys

    manifest = audio_manifest(tmp_path, 5)
    records, problems = read_input(manifest)
    make_shards(records, tmp_path / "local", problems=problems, shard_size=2, workers=1,
                progress=False)  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "slurm" / "make_shards.sbatch"
    env = {**os.environ, "OMNI_DS": str(Path(sys.executable).with_name("omni-ds")),
           "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(tmp_path)}  # fmt: skip
    logs = []
    for task in (0, 1):
        result = subprocess.run(
            ["bash", str(script), str(manifest), "--out", str(tmp_path / "array"),
             "--shard-size", "2"],
            env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        logs.append(result.stdout + result.stderr)
    assert "task 0 of 2 done; waiting" in logs[0] and "all tasks done" in logs[1]
    assert "task 0/2" in logs[0] and "task 1/2" in logs[1]
    written = file_tree(tmp_path / "local")
    assert {k: file_tree(tmp_path / "array")[k] for k in written} == written
