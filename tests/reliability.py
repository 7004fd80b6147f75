"""The reliability figures of docs/reliability.md, from real 2-rank runs (not part of the CI suite:
it takes 15-30 minutes on 2 cores; CI has one small test per mechanism).

    nice -n 19 .venv/bin/python tests/reliability.py [--kills 10 --save-kills 10 --lock-tries 3]
        [--out reliability.json]

Each run is ``omni-ds train configs/tiny.yaml`` on the synthetic corpus, 2 ranks, ZeRO-2 fp32,
ep_size 2, the Omni router, started through ``tests/harness.py`` as a launcher would. It measures:

1. random ``kill -9``: one run killed (every rank's process group) at a random moment (1-9
   steps after its resume point, plus a random fraction of a step) ``--kills`` times and
   resumed with ``--resume auto`` each time: every logged loss of every
   attempt, each rank's utterances per step, and the final weights must equal an uninterrupted
   run's, bitwise;
2. kills inside a save (``checkpoint.every_steps=1``; killed while a tag has files and no
   manifest): each time, the newest checkpoint that verifies is what ``latest`` names, complete;
3. one-byte damage (flip at the first, middle and last byte and 20 random positions, plus a
   one-byte truncation) of each kind of checkpoint file: main, expert, ZeRO shard, manifest;
   each must be detected by the manifest check;
4. the run-dir lock: a second training into a running run's dir is refused (exit 2), and after
   the holder is killed with -9 a new one takes the stale lock and resumes.

Prints a summary and writes every figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from harness import REPO, run_command, start_command  # noqa: E402
from test_train import kill_mid_save  # noqa: E402

from omni_ds.ckpt.format import MANIFEST, latest_checkpoint, verify  # noqa: E402
from omni_ds.train.metrics import read_records  # noqa: E402


def train_argv(corpus: Path, ds: Path, run_dir: Path, *sets: str) -> list[str]:
    options = [
        f"train.run_dir={run_dir}", f"data.train=[{corpus}/train]", "data.dev={}",
        f"data.tokenizer={corpus}/tokenizer.model", "data.max_batch_seconds=8",
        "data.max_duration=8", "data.num_workers=0", f"deepspeed={ds}", "model.moe.ep_size=2",
        "train.log_every=1", "train.progress_bar=false", "train.log_samples=true", *sets,
    ]  # fmt: skip
    return ["omni-ds", "train", "configs/tiny.yaml", *[a for o in options for a in ("--set", o)]]


def raw_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every train record of every attempt, superseded ones included."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r.get("kind") == "train"]


def samples(run_dir: Path, rank: int) -> list:
    return [(r["step"], r["keys"]) for r in read_records(run_dir / "samples" / f"rank{rank}.jsonl")]


def weights(tag: Path) -> dict:
    from omni_ds.ckpt.consolidate import consolidate

    return consolidate(tag).state_dict


def attempt(run_dir: Path) -> tuple[int, int]:
    """(resume lines so far, last train step logged after the last of them; -1 if none)."""
    marks, last = 0, -1
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0, -1
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if record.get("kind") == "resume":
            marks, last = marks + 1, -1
        elif record.get("kind") == "train":
            last = record["step"]
    return marks, last


def wait_for_step(run_dir: Path, group, after: int, timeout: float = 600) -> bool:
    """Wait until the attempt ``group`` runs (its resume line is there) has logged a step past
    ``after``; False when it ended first."""
    deadline = time.monotonic() + timeout
    marks = attempt(run_dir)[0] if (run_dir / "metrics.jsonl").exists() else -1
    while True:
        now, last = attempt(run_dir)
        # a fresh run dir gets no resume line; a resumed one gets one per attempt
        if (now > marks or marks == -1) and last > after:
            return True
        if any(p.poll() is not None for p in group.procs):
            return False
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def random_kills(corpus: Path, ds: Path, work: Path, kills: int, steps: int, rng) -> dict:
    sets = (f"train.max_steps={steps}", "checkpoint.every_steps=4", "checkpoint.keep_last=2")
    straight, killed = work / "straight", work / "killed"
    run_command(train_argv(corpus, ds, straight, *sets), 2, timeout=1800)
    reference = dict(raw_losses(straight))
    landed, resumed_from = 0, []
    while landed < kills:
        done = latest_checkpoint(killed / "checkpoints")
        start = int(done.name.split("_")[1]) if done else 0
        with start_command(train_argv(corpus, ds, killed, *sets) + ["--resume", "auto"],
                           2) as group:  # fmt: skip
            if not wait_for_step(killed, group, start + rng.randint(0, 8)):
                group.wait(timeout=120)
                break  # finished before the kill
            time.sleep(rng.uniform(0.0, 0.5))
            group.kill()
        landed += 1
        resumed_from.append(start)
        print(f"  kill {landed}: resumed from step {start}, killed at step "
              f"{attempt(killed)[1]}", flush=True)  # fmt: skip
    run_command(train_argv(corpus, ds, killed, *sets) + ["--resume", "auto"], 2, timeout=1800)
    records = raw_losses(killed)
    mismatched = [(s, v) for s, v in records if reference.get(s) != v]
    same_samples = all(samples(killed, r) == samples(straight, r) for r in range(2))
    a = weights(straight / "checkpoints" / f"step_{steps}")
    b = weights(killed / "checkpoints" / f"step_{steps}")
    same_weights = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    return {"kills": landed, "resumed_from": resumed_from, "logged_steps": len(records),
            "steps_redone": len(records) - steps, "mismatched_losses": len(mismatched),
            "same_samples": same_samples, "final_weights_bitwise_equal": same_weights}  # fmt: skip


def save_kills(corpus: Path, ds: Path, work: Path, kills: int) -> dict:
    run = work / "saves"
    argv = train_argv(corpus, ds, run, "train.max_steps=400", "checkpoint.every_steps=1",
                      "checkpoint.keep_last=2")  # fmt: skip
    ckpts = run / "checkpoints"
    landed, attempts, good = 0, 0, 0
    while landed < kills and attempts < 4 * kills:
        attempts += 1
        saving = kill_mid_save(argv + ["--resume", "auto"], ckpts)
        if saving is None:
            continue  # the kill landed just after the save finished
        landed += 1
        latest = (ckpts / "latest").read_text().strip()
        newest = latest_checkpoint(ckpts)
        ok = newest is not None and newest.name == latest and verify(newest) == []
        good += ok
        print(f"  save kill {landed}: interrupted {saving.name}, latest {latest} "
              f"{'complete and verifies' if ok else 'NOT complete'}", flush=True)  # fmt: skip
    return {"kills_inside_a_save": landed, "attempts": attempts, "latest_complete": good}


def corruptions(tag: Path, rng) -> dict:
    kinds = {"main": "mp_rank_00_model_states.pt",
             "expert": "layer_0_expert_1_mp_rank_00_model_states.pt",
             "zero shard": "zero_pp_rank_1_mp_rank_00_optim_states.pt", "manifest": MANIFEST}  # fmt: skip
    out = {}
    for kind, name in kinds.items():
        path = tag / name
        original = path.read_bytes()
        positions = [0, len(original) // 2, len(original) - 1]
        positions += [rng.randrange(len(original)) for _ in range(20)]
        detected = 0
        for at in positions:
            damaged = bytearray(original)
            damaged[at] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(damaged))
            detected += bool(verify(tag))
        path.write_bytes(original[:-1])
        detected += bool(verify(tag))
        path.write_bytes(original)
        assert verify(tag) == []
        out[kind] = {"damaged": len(positions) + 1, "detected": detected}
    return out


def lock_refusals(corpus: Path, ds: Path, work: Path, tries: int) -> dict:
    run = work / "locked"
    argv = train_argv(corpus, ds, run, "train.max_steps=400", "checkpoint.every_steps=5")
    refused, took_over = 0, 0
    for _ in range(tries):
        with start_command(argv + ["--resume", "auto"], 2) as first:
            done = latest_checkpoint(run / "checkpoints")
            wait_for_step(run, first, int(done.name.split("_")[1]) if done else 0)
            second = run_command(argv + ["--resume", "auto"], 2, check=False, timeout=300)
            refused += all(r.returncode == 2 and "is in use by another training" in r.stderr
                           for r in second[:1])  # fmt: skip
            first.kill()
        with start_command(argv + ["--resume", "auto"], 2) as third:
            done = latest_checkpoint(run / "checkpoints")
            took_over += wait_for_step(run, third, int(done.name.split("_")[1]) if done else 0)
            third.kill()
    return {"second_run_refused": refused, "tries": tries, "stale_lock_taken_over": took_over}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--save-kills", type=int, default=10)
    parser.add_argument("--lock-tries", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reliability.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    from data_pipeline.synth import generate

    results = {}
    with tempfile.TemporaryDirectory(prefix="omni-ds-reliability-") as tmp:
        work = Path(tmp)
        generate(work / "corpus", train_utterances=240, shard_size=60, vocab_size=64,
                 workers=1, progress=False)  # fmt: skip
        ds = json.loads((REPO / "ds_configs" / "zero1_fp32.json").read_text())
        ds["zero_optimization"]["stage"] = 2
        ds["tensorboard"]["enabled"] = False
        (work / "ds.json").write_text(json.dumps(ds))
        corpus, ds_path = work / "corpus", work / "ds.json"
        t0 = time.monotonic()
        phases = {
            "random_kills": lambda: random_kills(corpus, ds_path, work, args.kills, args.steps, rng),
            "save_kills": lambda: save_kills(corpus, ds_path, work, args.save_kills),
            "corruption": lambda: corruptions(latest_checkpoint(work / "killed" / "checkpoints"),
                                              rng),
            "lock": lambda: lock_refusals(corpus, ds_path, work, args.lock_tries),
        }  # fmt: skip
        for name, phase in phases.items():
            print(f"{name} ...", flush=True)
            results[name] = phase()
            results["minutes"] = round((time.monotonic() - t0) / 60, 1)
            args.out.write_text(json.dumps(results, indent=1))  # each phase as soon as it ends
            print(json.dumps(results[name]), flush=True)


if __name__ == "__main__":
    main()
