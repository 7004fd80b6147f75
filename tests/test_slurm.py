"""slurm/*.sbatch and omni-ds submit on a real SLURM cluster (2 simulated nodes on this host).

Training runs the tiny config on the synthetic corpus, 2 nodes x 1 rank (gloo, ep_size=2). The
straight run (submitted with ``omni-ds submit``) is the reference the interrupted runs must
reproduce: same steps, same samples on every rank, same losses.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from slurm_cluster import REPO, LocalCluster
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from omni_ds.ckpt.format import MANIFEST, latest_checkpoint
from omni_ds.cli import main
from omni_ds.train.metrics import read_metrics, read_records

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

STEPS = 12


@pytest.fixture(scope="session")
def cluster():
    c = LocalCluster.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.synth import generate

    out = tmp_path_factory.mktemp("corpus")
    generate(out, train_utterances=240, shard_size=60, vocab_size=64, workers=1, progress=False)
    return out


def overrides(corpus: Path, run_dir: Path, *more: str) -> list[str]:
    """``--set`` pairs: tiny on ``corpus``, 2-rank expert parallel, exact-resume ZeRO-1 fp32."""
    sets = [
        f"train.run_dir={run_dir}",
        f"data.train=[{corpus}/train]",
        "data.dev={}",
        f"data.tokenizer={corpus}/tokenizer.model",
        "model.vocab_size=64",
        "data.max_batch_seconds=30",
        "data.num_workers=0",
        "deepspeed=ds_configs/zero1_fp32.json",
        "model.moe.ep_size=2",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.progress_bar=false",
        "train.log_samples=true",
        "checkpoint.every_steps=0",
        *more,
    ]
    return [a for s in sets for a in ("--set", s)]


def submit_train(cluster: LocalCluster, corpus: Path, run_dir: Path, *more: str) -> str:
    """``sbatch slurm/train.sbatch`` on 2 nodes x 1 task; returns the job id."""
    return cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={run_dir}.out",
                          "slurm/train.sbatch", "configs/tiny.yaml",
                          *overrides(corpus, run_dir, *more))  # fmt: skip


def tensorboard_steps(run_dir: Path) -> list[list[int]]:
    """The ``train/loss`` steps of each attempt: one event file per process start, in order."""
    files = sorted(run_dir.glob("tensorboard/*/events.out.tfevents.*"),
                   key=lambda p: int(p.name.split(".")[3]))  # fmt: skip
    steps = []
    for f in files:
        events = EventFileLoader(str(f)).Load()
        steps.append([e.step for e in events for v in e.summary.value if v.tag == "train/loss"])
    return steps


def samples(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    records = read_records(run_dir / "samples" / f"rank{rank}.jsonl")
    return [(r["step"], r["keys"]) for r in records]


def losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir)
    assert len(records) == len({r["step"] for r in records}), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def wait_for_first_step(run_dir: Path, job_id: str, cluster: LocalCluster, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), cluster.job(job_id)
        assert time.monotonic() < deadline, f"no training step after {timeout} s"
        time.sleep(0.2)


def assert_resumed_like_reference(run_dir: Path, job: dict, reference: Path) -> int:
    """One requeue, the second attempt continuing right after the checkpoint, the same run as
    the reference; returns the step the job was interrupted at."""
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    assert job["Restarts"] == "1", job
    log = Path(f"{run_dir}.out").read_text()
    assert "restart=0: checkpoint written; requeueing" in log, log[-3000:]
    assert "restart=1: training finished" in log, log[-3000:]
    first, second = tensorboard_steps(run_dir)
    interrupted = first[-1]
    assert first == list(range(1, interrupted + 1)) and interrupted < STEPS
    assert second == list(range(interrupted + 1, STEPS + 1)), (first, second)
    assert losses(run_dir) == losses(reference)
    for rank in range(2):
        assert samples(run_dir, rank) == samples(reference, rank)
    assert latest_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / f"step_{STEPS}"
    return interrupted


def test_srun_on_two_nodes_brings_up_gloo(cluster):
    out = cluster.run("srun", "--nodes=2", "--ntasks=2", cluster.env["OMNI_DS"], "env", "--init")
    reports = sorted((json.loads(line) for line in out.splitlines()),
                     key=lambda r: r["launch"]["rank"])  # fmt: skip
    assert [r["launch"]["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["launch"]["launcher"] == "slurm" and r["launch"]["world_size"] == 2
        assert r["launch"]["master_addr"] == "n1"  # first node of n[1-2]
        assert r["backend"] == "gloo" and r["all_reduce_sum"] == 3.0


def test_submit_renders_sbatch_and_refuses_a_bad_config(corpus, tmp_path, capsys):
    argv = ["submit", "configs/tiny.yaml", "--nodes", "2", "--gpus-per-node", "4", "--time",
            "2:00:00", "--partition", "gpu", "--account", "asr", "--checkpoint-before", "120",
            *overrides(corpus, tmp_path / "run")]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    command = capsys.readouterr().out.split()
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2:00:00",
                   "--partition=gpu", "--account=asr", "--signal=B:USR1@120",
                   f"--output={tmp_path / 'run' / 'slurm-%j.out'}"):  # fmt: skip
        assert option in command
    assert command[command.index("configs/tiny.yaml") - 1].endswith("slurm/train.sbatch")
    # ep_size 3 cannot divide a world of 8: listed, nothing submitted, no run dir made.
    assert main([*argv, "--set", "model.moe.ep_size=3"]) == 2
    assert "ep_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory) -> Path:
    """The straight run: ``omni-ds submit`` (the real CLI) on 2 nodes x 1 task."""
    import subprocess

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    argv = [cluster.env["OMNI_DS"], "submit", "configs/tiny.yaml", "--nodes", "2",
            *overrides(corpus, run_dir)]  # fmt: skip
    result = subprocess.run(argv, env=cluster.env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), result.stdout
    job = cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    return run_dir


@pytest.mark.slow
def test_train_sbatch_two_nodes_trains_tiny_to_the_last_step(reference):
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))
    latest = latest_checkpoint(reference / "checkpoints")
    assert latest == reference / "checkpoints" / f"step_{STEPS}"
    assert (latest / MANIFEST).is_file()
    for rank in range(2):  # both ranks trained every step, on different utterances
        assert [s for s, _ in samples(reference, rank)] == list(range(1, STEPS + 1))
    assert not set(samples(reference, 0)[0][1]) & set(samples(reference, 1)[0][1])


@pytest.mark.slow
def test_eval_sbatch_exports_the_run_and_scores_it(cluster, corpus, reference, tmp_path):
    model, out = tmp_path / "model", tmp_path / "eval"
    job_id = cluster.sbatch(f"--export=ALL,EXPORT_RUN={reference}", "--cpus-per-task=1",
                            f"--output={tmp_path}/eval.out", "slurm/eval.sbatch", str(model),
                            "--test-set", f"dev={corpus}/dev", "--out", str(out))  # fmt: skip
    job = cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=180)
    assert job["JobState"] == "COMPLETED", (tmp_path / "eval.out").read_text()
    assert (model / "model.safetensors").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert f"exported step {STEPS}" in (tmp_path / "eval.out").read_text()
    (scores,) = report["models"]
    assert scores["sets"]["dev"]["utterances"] == 20 and 0 <= scores["mean_wer"]


@pytest.mark.slow
def test_usr1_to_the_batch_script_checkpoints_requeues_and_resumes(cluster, corpus, reference,
                                                                  tmp_path):  # fmt: skip
    run_dir = tmp_path / "run"
    job_id = submit_train(cluster, corpus, run_dir)
    wait_for_first_step(run_dir, job_id, cluster)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    job = cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    interrupted = assert_resumed_like_reference(run_dir, job, reference)
    assert (run_dir / "checkpoints" / f"step_{interrupted}" / MANIFEST).is_file()


@pytest.mark.slow
def test_partition_preemption_checkpoints_requeues_and_resumes(cluster, corpus, reference,
                                                               tmp_path):  # fmt: skip
    run_dir = tmp_path / "run"
    job_id = submit_train(cluster, corpus, run_dir)
    wait_for_first_step(run_dir, job_id, cluster)
    # A higher-tier job that needs every core of both nodes preempts the training job.
    urgent = cluster.sbatch("--partition=urgent", "--nodes=2", "--exclusive",
                            f"--output={tmp_path / 'urgent.out'}", "--wrap", "sleep 1")  # fmt: skip
    job = cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    assert cluster.job(urgent)["JobState"] == "COMPLETED"
    assert "USR1: asking every rank for a checkpoint" in Path(f"{run_dir}.out").read_text()
    assert_resumed_like_reference(run_dir, job, reference)


@pytest.mark.slow
def test_requeue_during_a_checkpoint_write_leaves_a_loadable_checkpoint(cluster, corpus,
                                                                         reference, tmp_path):  # fmt: skip
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    job_id = submit_train(cluster, corpus, run_dir, "checkpoint.every_steps=1")
    wait_for_first_step(run_dir, job_id, cluster)
    deadline = time.monotonic() + 120
    while True:  # a save under way: a tag directory with files but no manifest yet
        partial = [d for d in ckpts.glob("step_*") if not (d / MANIFEST).exists()
                   and any(d.iterdir())]  # fmt: skip
        if partial and latest_checkpoint(ckpts) is not None:
            break
        assert time.monotonic() < deadline and cluster.job(job_id)["JobState"] == "RUNNING"
    cluster.run("scontrol", "requeue", job_id)
    cluster.wait(job_id, ("PENDING",), timeout=60)
    # Between the attempts: the newest complete checkpoint is what the restart loads.
    resume_from = latest_checkpoint(ckpts)
    assert (resume_from / MANIFEST).is_file()
    job = cluster.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    first, second = tensorboard_steps(run_dir)
    assert second[0] == int(resume_from.name.split("_")[1]) + 1, (first, second, resume_from)
    assert second[-1] == STEPS
    assert losses(run_dir) == losses(reference)
    for rank in range(2):
        assert samples(run_dir, rank) == samples(reference, rank)


def test_make_shards_array_job_writes_what_the_local_command_writes(cluster, tmp_path):
    import numpy as np
    import soundfile as sf

    rows = []
    for i in range(9):
        pcm = (np.random.default_rng(i).standard_normal(4000 + 800 * i) * 3000).astype(np.int16)
        sf.write(tmp_path / f"u{i}.flac", pcm, 16000, subtype="PCM_16")
        rows.append({"audio_filepath": f"u{i}.flac", "text": f"word {i}",
                     "duration": len(pcm) / 16000})  # fmt: skip
    rows.append({"audio_filepath": "missing.flac", "text": "gone", "duration": 1.0})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local, array = tmp_path / "local", tmp_path / "array"
    assert main(["make-shards", str(manifest), "--out", str(local), "--shard-size", "2",
                 "--workers", "1"]) == 0  # fmt: skip

    job_id = cluster.sbatch("--array=0-1", f"--output={tmp_path}/%A_%a.out",
                            "slurm/make_shards.sbatch", str(manifest), "--out", str(array),
                            "--shard-size", "2")  # fmt: skip
    for task in (0, 1):
        job = cluster.wait(f"{job_id}_{task}", ("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
        assert job["JobState"] == "COMPLETED", (tmp_path / f"{job_id}_{task}.out").read_text()
    written = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert len([p for p in written if p.suffix == ".tar"]) == 5
    assert "missing.flac" in (local / "report.jsonl").read_text()
    for path in written:
        assert (array / path).read_bytes() == (local / path).read_bytes(), path
    # Each task wrote its own slice: shards 0, 2, 4 and shards 1, 3.
    logs = [(tmp_path / f"{job_id}_{t}.out").read_text() for t in (0, 1)]
    assert re.search(r"task 0/2: (.*\s)?3/3 shard", logs[0]), logs[0]
    assert re.search(r"task 1/2: (.*\s)?2/2 shard", logs[1]), logs[1]
