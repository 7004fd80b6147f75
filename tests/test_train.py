"""omni-ds train end to end: real DeepSpeed, 2 gloo ranks, ep_size=2, the synthetic corpus.

Each test runs the CLI through the harness as a launcher would, then reads what a user would:
``metrics.jsonl``, ``samples/rank<R>.jsonl``, ``checkpoints/``, exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from harness import run_command, start_command
from test_routing_trace import TRACE_SETS, check_trace_and_bias

from omni_ds.ckpt.format import MANIFEST, latest_checkpoint
from omni_ds.eval.trace_analysis import read_trace
from omni_ds.train.metrics import read_metrics, read_records
from omni_ds.train.trainer import EXIT_REQUEUE

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.synth import generate

    out = tmp_path_factory.mktemp("corpus")
    generate(out, train_utterances=240, shard_size=60, vocab_size=64, workers=1, progress=False)
    return out


def train_argv(corpus: Path, run_dir: Path, *sets: str, ds: str = "zero1_fp32.json") -> list:
    """``omni-ds train configs/tiny.yaml`` on ``corpus``, 2-rank expert parallel, small batches."""
    options = [
        f"train.run_dir={run_dir}",
        f"data.train=[{corpus}/train]",
        f"data.dev={{dev: {corpus}/dev}}",
        f"data.tokenizer={corpus}/tokenizer.model",
        "data.max_batch_seconds=30",
        "data.num_workers=0",
        f"deepspeed=ds_configs/{ds}",
        "model.moe.ep_size=2",
        "train.log_every=1",
        "train.progress_bar=false",
        *sets,
    ]
    return ["omni-ds", "train", "configs/tiny.yaml", *[a for o in options for a in ("--set", o)]]


def losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def sample_log(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    records = read_records(run_dir / "samples" / f"rank{rank}.jsonl")
    return [(r["step"], r["keys"]) for r in records]


def final_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint: the dense module state plus each expert file."""
    state = dict(
        torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    )
    for f in sorted(checkpoint.glob("layer_*_expert_*_model_states.pt")):
        state.update(torch.load(f, weights_only=False))
    return state


def test_two_ranks_zero2_expert_parallel_omni_router_loss_falls(corpus, tmp_path):
    """Also with expert-bias balancing and the routing trace on (tests/test_routing_trace.py
    checks what this run wrote for them)."""
    run = tmp_path / "run"
    sets = ("train.max_steps=20", *TRACE_SETS)
    run_command(train_argv(corpus, run, *sets, ds="zero2_bf16.json"), 2)
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 21))
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    final = records[-1]
    assert 0 < final["grad_norm"] < float("inf") and final["lr"] > 0
    assert final["mfu"] > 0 and final["audio_seconds_per_s"] > 0 and final["tokens_per_s"] > 0
    assert sum(final[f"routing/layer0/usage{e}"] for e in range(4)) == pytest.approx(1.0)
    assert "routing/layer3/entropy" in final and "balance" in final and "z" in final
    (dev,) = read_metrics(run, kind="dev/dev")
    assert dev["step"] == 20 and dev["utterances"] == 20 and 0 <= dev["wer"]
    assert (run / "config.yaml").is_file() and "ep_size: 2" in (run / "config.yaml").read_text()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_20"
    check_trace_and_bias(run, steps=20, ranks=2, tmp_path=tmp_path)


@pytest.mark.slow
def test_kill9_and_resume_gives_the_straight_run(corpus, tmp_path):
    """N+M steps straight vs killed with -9 after a checkpoint and resumed with --resume auto:
    the same losses, the same samples at every step on every rank, the same final weights."""
    # Small batches, so that all 12 steps stay inside the first epoch.
    sets = ("train.max_steps=12", "checkpoint.every_steps=4", "train.log_samples=true",
            "data.max_duration=8", "data.max_batch_seconds=8", *TRACE_SETS)  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_command(train_argv(corpus, straight, *sets), 2)

    with start_command(train_argv(corpus, resumed, *sets), 2) as group:
        while latest_checkpoint(resumed / "checkpoints") is None:
            assert all(p.poll() is None for p in group.procs), "run ended before a checkpoint"
            time.sleep(0.01)
        group.kill()  # SIGKILL to every rank's process group
    killed_at = int(latest_checkpoint(resumed / "checkpoints").name.split("_")[1])
    assert killed_at < 12
    run_command(train_argv(corpus, resumed, *sets) + ["--resume", "auto"], 2)

    assert losses(resumed) == losses(straight)
    keys = []
    for rank in range(2):
        assert sample_log(resumed, rank) == sample_log(straight, rank)
        keys += [k for _, batch in sample_log(resumed, rank) for k in batch]
    assert len(keys) == len(set(keys)) > 12 * 2  # no utterance twice within the epoch
    a = final_weights(straight / "checkpoints" / "step_12")
    b = final_weights(resumed / "checkpoints" / "step_12")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["router.balance_bias"].abs().sum() > 0  # the expert bias, resumed bitwise too
    # the routing trace as analyze --trace reads it: the straight run's records, bitwise
    assert read_trace(resumed) == read_trace(straight)


def saving_tag(ckpts: Path) -> Path | None:
    """A tag directory being written (files, no manifest yet) newer than a complete one."""
    complete = latest_checkpoint(ckpts)
    if complete is None:
        return None
    newest = int(complete.name.split("_")[1])
    for d in ckpts.glob("step_*"):
        try:
            if int(d.name.split("_")[1]) > newest and any(d.iterdir()):
                return d if not (d / MANIFEST).exists() else None
        except (FileNotFoundError, ValueError):  # removed while we looked; not a step_<N> tag
            continue
    return None


def kill_mid_save(argv: list, ckpts: Path) -> Path | None:
    """Start ``argv``, SIGKILL every rank while a checkpoint is being written; returns the
    interrupted tag if the kill landed before its manifest (it can land just after)."""
    with start_command(argv, 2) as group:
        while (saving := saving_tag(ckpts)) is None:
            if any(p.poll() is not None for p in group.procs):
                group.wait(timeout=60)  # raises with every rank's stderr if one failed
                raise AssertionError("the run ended before a save was hit")
        group.kill()
    return saving if not (saving / MANIFEST).exists() else None


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_keeps_the_previous_one(corpus, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(corpus, run, "train.max_steps=60", "checkpoint.every_steps=2")
    ckpts = run / "checkpoints"
    for _ in range(3):  # each attempt resumes the previous one's checkpoints
        interrupted = kill_mid_save(argv, ckpts)
        if interrupted is not None:
            break
    assert interrupted is not None, "no kill landed inside a save in 3 attempts"
    previous = latest_checkpoint(ckpts)
    step = int(previous.name.split("_")[1])
    assert step < int(interrupted.name.split("_")[1])

    resume = train_argv(corpus, run, f"train.max_steps={step + 2}", "checkpoint.every_steps=2")
    run_command(resume, 2)
    assert sorted(losses(run)) == list(range(1, step + 3))
    assert latest_checkpoint(ckpts).name == f"step_{step + 2}"


@pytest.mark.slow
def test_sigusr1_checkpoints_at_the_next_step_and_exits_for_requeue(corpus, tmp_path):
    run = tmp_path / "run"
    # Decoding workers on: the signal reaches them too (SLURM signals every process of the step)
    # and they must ignore it.
    sets = ("train.max_steps=500", "checkpoint.every_steps=0", "data.num_workers=1")
    with start_command(train_argv(corpus, run, *sets), 2) as group:
        while len(read_metrics(run)) < 3:
            assert all(p.poll() is None for p in group.procs), "run ended early"
            time.sleep(0.05)
        for p in group.procs:
            os.killpg(p.pid, signal.SIGUSR1)
        results = group.wait(timeout=120, check=False)
    assert [r.returncode for r in results] == [EXIT_REQUEUE] * 2, results[0].stderr[-3000:]
    saved = latest_checkpoint(run / "checkpoints")
    step = int(saved.name.split("_")[1])
    assert 3 <= step < 500
    assert max(losses(run)) == step  # saved at the step boundary right after the signal

    run_command(train_argv(corpus, run, *sets[1:], f"train.max_steps={step + 2}"), 2)
    assert sorted(losses(run)) == list(range(1, step + 3))


@pytest.mark.slow
def test_diverging_run_stops_after_k_nonfinite_losses(corpus, tmp_path):
    ds = json.loads(Path("ds_configs/zero1_fp32.json").read_text())
    ds["optimizer"]["params"]["lr"] = 1e30
    del ds["scheduler"]  # constant learning rate
    ds["gradient_clipping"] = 0.0
    (tmp_path / "diverge.json").write_text(json.dumps(ds))
    argv = train_argv(corpus, tmp_path / "run", "train.max_steps=50", "model.moe.ep_size=1",
                      "train.max_nonfinite_in_a_row=3", f"deepspeed={tmp_path}/diverge.json")  # fmt: skip
    (result,) = run_command(argv, 1, check=False)
    assert result.returncode != 0
    assert "NonFiniteLoss: 3 non-finite losses in a row" in result.stderr
    assert losses(tmp_path / "run")  # the finite steps before were trained and logged


def test_train_refuses_a_bad_config_before_starting(corpus, tmp_path, capsys):
    from omni_ds.cli import main

    argv = train_argv(corpus, tmp_path / "run", "model.moe.ep_size=3")[1:]
    assert main(argv) == 2
    assert "ep_size" in capsys.readouterr().err
    argv = train_argv(corpus, tmp_path / "run", ds="zero2_fp16.json")[1:]
    assert main(argv) == 2
    assert "DeepSpeed's CPU accelerator refuses fp16" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_fall_back_or_refuse_and_logs_are_appended(corpus, tmp_path):
    """One rank, checkpoints at steps 2 and 4, dev evaluations at 2 and 4. One flipped byte in
    step_4 (same size): ``--resume auto`` falls back to step_2, says so, redoes steps 3-4 with
    the same losses and the same dev loss (dev evaluation depends on the weights only, not on
    how many evaluations this process ran), appending to metrics.jsonl with a resume line. Then
    every checkpoint one byte short: refused with exit 2, nothing trained, nothing rewritten."""
    run = tmp_path / "run"
    argv = train_argv(corpus, run, "model.moe.ep_size=1", "train.max_steps=4", "train.dev_every=2",
                      "checkpoint.every_steps=2", "checkpoint.keep_last=2")  # fmt: skip
    run_command(argv, 1)
    straight, straight_dev = losses(run), read_metrics(run, kind="dev/dev")
    assert [d["step"] for d in straight_dev] == [2, 4]
    _flip_byte(run / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt")

    (result,) = run_command([*argv, "--resume", "auto"], 1)
    assert "passed over: step_4:" in result.stderr and "checksum" in result.stderr
    assert losses(run) == straight
    assert read_metrics(run, kind="dev/dev") == straight_dev  # exactly, dev loss included
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (mark,) = [x for x in lines if x["kind"] == "resume"]
    assert (mark["step"], mark["checkpoint"], mark["passed_over"]) == (2, "step_2", ["step_4"])
    assert len(lines) == len(straight) + 2 + 1 + 2 + 1  # first run, then resume + steps 3-4 + dev

    for tag in (run / "checkpoints").glob("step_*"):
        main = tag / "mp_rank_00_model_states.pt"
        main.write_bytes(main.read_bytes()[:-1])
    before = (run / "metrics.jsonl").read_text()
    (result,) = run_command([*argv, "--resume", "auto"], 1, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "none verifies" in x]
    assert "holds 2 checkpoint(s)" in line and "--resume none" in line, line
    assert (run / "metrics.jsonl").read_text() == before


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (sig - 1) & 1)


def test_a_stop_signal_during_start_up_exits_75_without_a_checkpoint(corpus, tmp_path):
    """SIGUSR1 as soon as the process can take one (long before the first step): the process
    is not killed by it, and leaves for requeue with nothing saved."""
    run = tmp_path / "run"
    with start_command(train_argv(corpus, run, "model.moe.ep_size=1", "train.max_steps=50"),
                       1) as group:  # fmt: skip
        (p,) = group.procs
        while not _catches(p.pid, signal.SIGUSR1):
            assert p.poll() is None, group.wait(timeout=60)
            time.sleep(0.005)
        p.send_signal(signal.SIGUSR1)
        (result,) = group.wait(timeout=120, check=False)
    assert result.returncode == EXIT_REQUEUE, result.stderr[-3000:]
    assert "stop signal before the first step; exit 75" in result.stderr
    assert not list((run / "checkpoints").glob("step_*")) and not read_metrics(run)


def test_a_second_training_is_refused_and_orphaned_ranks_stop(corpus, tmp_path):
    """A run holds its run dir: a second ``omni-ds train`` into it exits 2 naming the holder.
    Then the first run's launcher is killed with -9 (its rank runs in its own session, as
    torchrun's do): the rank stops within seconds, writing nothing more."""
    import subprocess
    import sys

    from harness import _free_port, rank_environ

    run = tmp_path / "run"
    argv = train_argv(corpus, run, "model.moe.ep_size=1", "train.max_steps=500",
                      "checkpoint.every_steps=0", "checkpoint.save_final=false")  # fmt: skip
    spawn = "import subprocess, sys; p = subprocess.Popen(sys.argv[1:], start_new_session=True)" \
            "; print(p.pid, flush=True); p.wait()"  # fmt: skip
    env = rank_environ(0, 1, _free_port())
    launcher = subprocess.Popen(
        [sys.executable, "-c", spawn, sys.executable, "-m", "omni_ds.cli", *argv[1:]],
        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "rank.err", "w"), text=True,
        start_new_session=True,
    )  # fmt: skip
    rank = int(launcher.stdout.readline())
    try:
        while len(read_metrics(run)) < 2:
            assert launcher.poll() is None, (tmp_path / "rank.err").read_text()[-3000:]
            time.sleep(0.05)
        (second,) = run_command(argv, 1, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"cannot train: {run} is in use by another training (pid {rank} " in second.stderr

        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{rank}").exists() and "Z" not in _state(rank):
            assert time.monotonic() < deadline, "the orphaned rank kept running"
            time.sleep(0.05)
    finally:
        if Path(f"/proc/{rank}").exists():
            os.kill(rank, signal.SIGKILL)
    logged = (run / "metrics.jsonl").read_text()
    time.sleep(1)
    assert (run / "metrics.jsonl").read_text() == logged
    assert not list((run / "checkpoints").glob("step_*"))
    assert "the launcher" in (tmp_path / "rank.err").read_text()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
