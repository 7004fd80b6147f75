"""Shards on object storage and web servers (data_pipeline.remote), against real servers on
localhost that the tests start and stop by PID: moto's S3 server (read through s3fs) and
tests/range_server.py (an HTTP server that honours Range, and drops, fails or delays requests on
demand).

One local 2-rank training is the reference; the same training reads its shards from the HTTP
server while it misbehaves, and from S3 killed with -9 after its first checkpoint and resumed:
both give the reference's samples at every step on every rank, and its losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import range_server
import torch
from harness import run_command, start_command
from test_shards import audio_manifest, file_tree
from test_train import final_weights, losses, sample_log, train_argv

from data_pipeline.config import DataConfig
from data_pipeline.plan import Catalog
from data_pipeline.reader import BatchReader
from data_pipeline.remote import Remote, redact
from data_pipeline.sources import SourceError, expand, open_shards
from omni_ds.ckpt.format import latest_checkpoint
from omni_ds.cli import main
from omni_ds.train.metrics import read_metrics

SECRET = "sEcReT-k3y-that-must-not-leak"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
       "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.synth import generate

    out = tmp_path_factory.mktemp("corpus")
    generate(out, train_utterances=120, shard_size=30, vocab_size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def s3(corpus, tmp_path_factory):
    """A moto S3 server holding the corpus in ``bucket/`` (the training shards without their
    index: it is built from S3); yields its Remote."""
    port = range_server.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    mp = pytest.MonkeyPatch()
    for k, v in AWS.items():
        mp.setenv(k, v)
    try:
        range_server.wait_listening(port, proc)
        remote = Remote(endpoint_url=f"http://127.0.0.1:{port}")
        fs = remote.filesystem("s3://bucket")
        fs.mkdir("bucket")
        upload = tmp_path_factory.mktemp("upload")
        shutil.copytree(corpus, upload, dirs_exist_ok=True)
        (upload / "train" / "index.json").unlink()
        fs.put(f"{upload}/", "bucket/", recursive=True)
        yield remote
    finally:
        mp.undo()
        proc.kill()
        proc.wait()


def test_url_forms_and_permanent_errors_counted_as_for_files(corpus, s3, tmp_path):
    local = open_shards(corpus / "train")
    names = [s["name"] for s in local.shards]
    brace = "s3://bucket/train/shard-{000000..000003}.tar"
    assert (
        expand(brace, s3)
        == expand("s3://bucket/train", s3)
        == [f"s3://bucket/train/{n}" for n in names]
    )
    assert expand("s3://bucket/train/*.tar", s3) == expand(brace, s3)
    with pytest.raises(SourceError, match=r"1 of the 5 shards .*shard-000004\.tar"):
        expand("s3://bucket/train/shard-{000000..000004}.tar", s3)
    with pytest.raises(SourceError, match="names no .tar shard"):
        expand("s3://bucket/nothing", s3)
    # The index built from S3 is the local one; the HTTP server is read through its index.json.
    remote_set = open_shards(brace, remote=s3)
    assert remote_set.shards == local.shards
    proc, url = range_server.start(corpus)
    try:
        http_set = open_shards(f"{url}/train/", remote=Remote())
        assert http_set.shards == local.shards and http_set.directory == f"{url}/train"
        ids = list(range(len(Catalog.from_sets([local]))))
        expected = BatchReader(Catalog.from_sets([local])).read_batch(ids)
        for shard_set in (remote_set, http_set):
            batch = BatchReader(Catalog.from_sets([shard_set])).read_batch(ids)
            assert batch["keys"] == expected["keys"]
            assert torch.equal(batch["audio"], expected["audio"]) and batch["_retries"] == 0
    finally:
        proc.kill()
        proc.wait()
    # Permanent failures: an object deleted, one cut short (after indexing): counted as for files.
    fs = s3.filesystem("s3://bucket")
    fs.put(f"{corpus}/train/", "bucket/broken/", recursive=True)
    broken = open_shards("s3://bucket/broken", remote=s3)
    fs.rm(f"bucket/broken/{names[1]}")
    fs.pipe(f"bucket/broken/{names[2]}", (corpus / "train" / names[2]).read_bytes()[:20000])
    batch = BatchReader(Catalog.from_sets([broken])).read_batch(ids)
    n = [s["num_samples"] for s in local.shards]
    assert batch["_skipped"]["missing_shard"] == n[1]
    assert 0 < batch["_skipped"]["corrupt_member"] <= n[2]
    assert len(batch["keys"]) == len(ids) - sum(batch["_skipped"].values())
    assert batch["_retries"] == 0


def test_make_shards_to_s3_uploads_what_it_writes_locally(s3, tmp_path, capsys):
    manifest = audio_manifest(tmp_path, 7)
    with manifest.open("a") as f:
        f.write("\n" + json.dumps({"audio_filepath": "missing.flac", "text": "gone"}))
    common = [str(manifest), "--shard-size", "2", "--workers", "2", "--endpoint-url",
              s3.endpoint_url]  # fmt: skip
    url = "s3://bucket/made/train"
    assert main(["make-shards", *common, "--out", str(tmp_path / "local")]) == 0
    assert main(["make-shards", *common, "--out", url]) == 0
    assert f"{url}: 4 shards (4 written now), 7 utterances" in capsys.readouterr().out
    fs = s3.filesystem(url)
    written = {k: v for k, v in file_tree(tmp_path / "local").items() if k[0] != "."}
    assert len(written) == 6 and b"missing.flac" in written["report.jsonl"]
    assert {name: fs.cat_file(f"{url}/{name}") for name in written} == written
    # The loader reads from the store the keys and audio it reads from the local directory.
    local, remote = open_shards(tmp_path / "local"), open_shards(url, remote=s3)
    ids = list(range(7))
    expected = BatchReader(Catalog.from_sets([local])).read_batch(ids)
    batch = BatchReader(Catalog.from_sets([remote])).read_batch(ids)
    assert batch["keys"] == expected["keys"] and len(set(batch["keys"])) == 7
    assert torch.equal(batch["audio"], expected["audio"])
    # A rerun skips complete shards; one gone from the store, or whose part is damaged, is
    # rebuilt to the same bytes.
    fs.rm(f"{url}/shard-000002.tar")
    fs.pipe_file(f"{url}/.parts/shard-000003.tar.json", b"{not json")
    assert main(["make-shards", *common, "--out", url]) == 0
    assert "4 shards (2 written now)" in capsys.readouterr().out
    assert {name: fs.cat_file(f"{url}/{name}") for name in written} == written
    assert not any(SECRET.encode() in fs.cat_file(key) for key in fs.find(url))
    # --index-only of the uploaded shards (into the cache) indexes them as make-shards did.
    assert main(["make-shards", f"{url}/shard-*.tar", "--index-only", "--endpoint-url",
                 s3.endpoint_url]) == 0  # fmt: skip
    assert "4 shards, 7 samples" in capsys.readouterr().out
    # No such bucket: one line naming the URL, exit 2, before any work.
    assert main(["make-shards", *common, "--out", "s3://no-such-bucket/train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3://no-such-bucket/train: bucket no-such-bucket" in err
    assert not fs.exists("s3://no-such-bucket")


def test_credentials_never_in_urls():
    with pytest.raises(ValueError, match="never put credentials in a URL"):
        DataConfig(train=["https://user:pw@host/train/"])
    assert redact("https://user:pw@host:8/a/b.tar?X-Amz-Signature=s") == "https://host:8/a/b.tar"


STEPS = ("train.max_steps=6", "checkpoint.every_steps=3", "train.log_samples=true",
         "data.max_duration=8", "data.max_batch_seconds=8")  # fmt: skip


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("local") / "run"
    run_command(train_argv(corpus, run, *STEPS), 2)
    return run


def same_training(a: Path, b: Path) -> None:
    assert losses(a) == losses(b) and len(losses(a)) == 6
    keys = []
    for rank in range(2):
        assert sample_log(a, rank) == sample_log(b, rank)
        keys += [k for _, batch in sample_log(a, rank) for k in batch]
    assert len(keys) == len(set(keys)) > 6 * 2  # nothing read twice, nothing lost


@pytest.mark.slow
def test_training_from_a_flaky_http_server_retries_and_reads_every_sample(
    corpus, reference, tmp_path
):
    log = tmp_path / "faults.log"
    proc, url = range_server.start(corpus, "--drop-every", "9", "--fail-every", "13",
                                   "--delay-every", "17", "--delay", "4", log=log)  # fmt: skip
    try:
        run = tmp_path / "run"
        sets = (f"data.train=[{url}/train]", "data.remote_timeout=2", *STEPS)
        ranks = run_command(train_argv(corpus, run, *sets), 2)
    finally:
        proc.kill()
        proc.wait()
    same_training(run, reference)
    faults = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("fault ")]
    assert set(faults) == {"drop", "fail", "delay"}
    # Every fault is retried; the count may differ from the faults injected: aiohttp itself
    # retries a request whose reused connection dropped (once, uncounted), and on a loaded
    # machine a slow answer can time out as well.
    assert len(faults) >= 3 and read_metrics(run)[-1]["data_retries"] > 0
    assert "retry 1 of 6" in ranks[0].stderr + ranks[1].stderr


@pytest.mark.slow
def test_training_from_s3_killed_and_resumed_continues_bitwise(corpus, s3, reference, tmp_path):
    run = tmp_path / "run"
    sets = ("data.train=[s3://bucket/train]", "data.dev={dev: s3://bucket/dev}",
            f"data.endpoint_url={s3.endpoint_url}", *STEPS)  # fmt: skip
    env = AWS
    with start_command(train_argv(corpus, run, *sets), 2, env=env) as group:
        while latest_checkpoint(run / "checkpoints") is None:
            assert all(p.poll() is None for p in group.procs), "run ended before a checkpoint"
            time.sleep(0.01)
        group.kill()  # SIGKILL to every rank's process group
    assert int(latest_checkpoint(run / "checkpoints").name.split("_")[1]) < 6
    ranks = run_command(train_argv(corpus, run, *sets) + ["--resume", "auto"], 2, env=env)
    same_training(run, reference)
    a = final_weights(reference / "checkpoints" / "step_6")
    b = final_weights(run / "checkpoints" / "step_6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dev, dev_reference = (
        read_metrics(run, kind="dev/dev")[-1],
        read_metrics(reference, kind="dev/dev")[-1],
    )
    assert dev["utterances"] == 20 and dev["loss"] == dev_reference["loss"]
    # The secret key reached the ranks (they read S3 with it) but nothing they wrote.
    written = [p.read_bytes() for p in run.rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in b for b in written)
    assert all(SECRET not in r.stdout + r.stderr for r in ranks)
