"""Peak resident memory of resharding vs loading the optimizer state, on a real checkpoint.

    .venv/bin/python benchmarks/reshard_memory.py [--d-model 256 --layers 6 --experts 8]

Writes a 1-rank ZeRO-2 checkpoint of the encoder (one optimizer step, so Adam moments exist),
then, each in a fresh process, measures the peak anonymous resident memory (``RssAnon``, sampled
every 2 ms; memory-mapped file pages do not count, the kernel can drop them) of:

* baseline: ``torch.load`` of every ZeRO shard, i.e. holding the optimizer state in memory, which
  any non-streaming reshard needs at least;
* ``omni_ds.ckpt.reshard.reshard`` to 4 ranks with ep_size 4, and back to 1 rank (the largest
  output shard: the whole state in one file).

Prints MiB and the ratio reshard / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn) -> int:
    """Peak RssAnon growth (bytes) while ``fn()`` runs."""
    base, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    return max(peak[0], rss_anon()) - base


def write_checkpoint(out: Path, d_model: int, layers: int, experts: int) -> Path:
    from omni_ds import dist
    from omni_ds.config.experiment import ExperimentConfig
    from omni_ds.config.loading import from_dict
    from omni_ds.model.encoder import build_model
    from omni_ds.train.engine import build_engine

    model = {"vocab_size": 64, "d_model": d_model, "n_layers": layers, "n_heads": 4,
             "d_ff": 4 * d_model, "frontend": {"n_mels": 16},
             "moe": {"num_experts": experts, "ep_size": 1}}  # fmt: skip
    cfg = from_dict(ExperimentConfig, {"model": model})
    with dist.distributed():
        encoder = build_model(cfg.model)
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}  # fmt: skip
        engine = build_engine(encoder, ds)
        out_ = engine(torch.randn(1, 16000), torch.tensor([16000]))
        engine.backward(encoder.loss(out_, torch.ones(1, 3, dtype=torch.long),
                                     torch.tensor([3])).total)  # fmt: skip
        engine.step()
        engine.save_checkpoint(str(out), tag="step_1")
        params = sum(p.numel() for p in encoder.parameters())
    return out / "step_1", params


def child(mode: str, src: str, out: str) -> None:
    import omni_ds  # noqa: F401  (CPU accelerator before deepspeed)

    if mode == "baseline":
        shards = sorted(Path(src).glob("*zero_pp_rank_*"))
        held = []
        peak = measure(lambda: held.extend(torch.load(f, weights_only=False) for f in shards))
    else:
        from omni_ds.ckpt.reshard import reshard

        world, ep = map(int, mode.split("x"))
        peak = measure(lambda: reshard(src, out, world_size=world, ep_size=ep))
    print(json.dumps({"peak": peak}))


def run_child(mode: str, src: Path, out: Path) -> int:
    # The caller's PYTHONPATH stays behind the repository: it may hold the dependencies.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *inherited]), DS_ACCELERATOR="cpu"
    )
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        src, params = write_checkpoint(tmp / "src", args.d_model, args.layers, args.experts)
        state = sum(f.stat().st_size for f in src.glob("*zero_pp_rank_*"))
        mib = 2**20
        print(f"checkpoint: {params / 1e6:.1f}M parameters, ZeRO shards {state / mib:.0f} MiB")
        baseline = run_child("baseline", src, tmp / "unused")
        print(f"baseline (load the optimizer state): peak RssAnon +{baseline / mib:.0f} MiB")
        for mode in ("4x4", "1x1"):
            peak = run_child(mode, src, tmp / f"out{mode}")
            print(f"reshard to {mode.replace('x', ' ranks, ep_size ')}: peak RssAnon "
                  f"+{peak / mib:.0f} MiB, ratio to baseline {peak / baseline:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
