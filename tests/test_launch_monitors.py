"""One real 2-rank run the way a user with a monitoring stack and the deepspeed launcher starts
it: ``deepspeed --num_gpus 2 --module omni_ds.cli train ...`` (CPU accelerator, gloo) without
``--no_local_rank``; an HJSON DeepSpeed config with HF-style "auto" values, W&B (offline, the real
wandb package) and the CSV monitor; stderr to a file as in a SLURM job. Then it reads what the
user would: the W&B run file, the CSV files, and the plain progress lines."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import child_pythonpath

pytest.importorskip("wandb")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

DS_HJSON = """\
// what a Hugging Face user brings: comments, "auto" values, W&B
{
  train_micro_batch_size_per_gpu: "auto",
  gradient_accumulation_steps: "auto",
  train_batch_size: "auto",
  gradient_clipping: "auto",
  steps_per_print: 1000000,
  optimizer: {type: "AdamW", params: {lr: 1e-3, betas: [0.9, 0.98], eps: 1e-8,
                                      weight_decay: 0.01, torch_adam: true}},
  scheduler: {type: "WarmupDecayLR", params: {warmup_min_lr: "auto", warmup_max_lr: "auto",
                                              warmup_num_steps: 1, total_num_steps: "auto"}},
  zero_optimization: {stage: 1},
  csv_monitor: {enabled: true, output_path: "csv"},   // relative: into the run dir
  wandb: {enabled: true, project: "omni-ds-test", group: "ci"},
}
"""


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (a LevelDB-style log of 32 KiB blocks after a
    7-byte header), as ``wandb sync`` reads them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(wandb_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run under ``wandb_dir``."""
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, history = {}, []

    def items(entries) -> dict:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in entries}

    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update(items(record.config.update))
        elif kind == "history":
            history.append(items(record.history.item))
    return config, history


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from data_pipeline.synth import generate

    root = tmp_path_factory.mktemp("launch")
    corpus = root / "corpus"
    generate(corpus, train_utterances=48, shard_size=24, vocab_size=64, workers=1, progress=False)
    (root / "ds.hjson").write_text(DS_HJSON)
    sets = [
        f"train.run_dir={root / 'run'}",
        f"data.train=[{corpus}/train]",
        f"data.dev={{dev: {corpus}/dev}}",
        f"data.tokenizer={corpus}/tokenizer.model",
        "data.max_batch_seconds=30",
        "data.num_workers=0",
        f"deepspeed={root / 'ds.hjson'}",
        "model.vocab_size=64",
        "model.moe.ep_size=2",
        "train.log_every=1",
        f"train.max_steps={STEPS}",
        "train.dev_max_batches=1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
               OMP_NUM_THREADS="1", PYTHONPATH=child_pythonpath())  # fmt: skip
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    argv = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
            "omni_ds.cli", "train", "configs/tiny.yaml",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    with open(root / "stderr.log", "w") as err, open(root / "stdout.log", "w") as out:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=err, timeout=600)
    stderr = (root / "stderr.log").read_text()
    assert proc.returncode == 0, stderr[-4000:] + (root / "stdout.log").read_text()[-2000:]
    return root, stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_with_local_rank_trains(run):
    root, _ = run
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    # the "auto" values were resolved: 1 × 1 × 2 ranks, scheduler length = train.max_steps
    with open(root / "run" / "csv" / "train" / "train_lr.csv") as f:
        lrs = [float(row[1]) for row in list(csv.reader(f))[1:]]
    assert lrs[-1] > 0 and len(lrs) == STEPS


def test_wandb_run_gets_the_config_and_routing_metrics(run):
    root, _ = run
    config, history = wandb_run(root)
    assert config["experiment"]["train"]["max_steps"] == STEPS
    assert config["experiment"]["model"]["moe"]["router"] == "omni"
    assert config["deepspeed"]["train_batch_size"] == 2  # "auto" resolved
    rows = [r for r in history if "train/loss" in r]
    assert [r["train/step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("train/routing/layer0/entropy" in r for r in rows)
    assert any("dev/dev/wer" in r for r in history)


def test_csv_monitor_writes_into_the_run_dir(run):
    root, _ = run
    folder = root / "run" / "csv" / "train"
    with open(folder / "train_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"] and [int(r[0]) for r in rows[1:]] == [1, 2, 3]
    assert (folder / "train_routing_layer0_entropy.csv").is_file()
    assert (folder / "dev_dev_wer.csv").is_file()


def test_stderr_in_a_file_gets_plain_progress_lines(run):
    _, stderr = run
    lines = [ln for ln in stderr.splitlines() if ln.startswith("step ")]
    assert len(lines) == STEPS, stderr[-3000:]
    pattern = (
        r"step (\d+)/3 \| loss [\d.e+-]+ \| ctc [\d.e+-]+ \| lr [\d.e+-]+ \| grad_norm [\d.e+-]+ "
        r"\| audio [\d.]+ s/s \| mfu [\d.]+% \| eta \d+:\d\d:\d\d \| skipped \d+"
    )
    assert [int(re.fullmatch(pattern, ln)[1]) for ln in lines] == [1, 2, 3]
    assert re.search(r"^dev dev @ step 3 \| loss [\d.]+ \| wer [\d.]+% \| utterances \d+$",
                     stderr, re.M)  # fmt: skip
    assert "\r" not in stderr  # no tqdm bar in a log file
