"""What checksummed, fsynced checkpoints cost: save throughput vs the disk's raw write
bandwidth, and verify-before-load time vs load time, measured in one run.

    .venv/bin/python benchmarks/ckpt_io.py [--d-model 384 --layers 6 --experts 8 --repeats 3]
        [--dir DIR]   # where to write (default: a temporary dir in the repo, i.e. its disk)

One process builds the encoder with a 1-rank ZeRO-1 engine (one optimizer step, so the Adam
moments exist) and then, ``--repeats`` times, interleaved so that other load on the machine hits
both alike:

* raw: a plain write of as many random bytes as one checkpoint has, 8 MiB at a time, then
  ``fsync``: what the disk takes;
* plain: DeepSpeed's own ``save_checkpoint`` with its stock checkpoint engine (no digests, no
  fsync: what saving cost before omni-ds added them);
* save: ``Checkpointer.save`` (DeepSpeed's ``save_checkpoint`` with each file digested with
  xxh3-128 and fsynced right after it is written, then the manifest and ``latest``).

Then the newest checkpoint is verified against its manifest (every file read and digested) and
loaded by the engine (``load_checkpoint`` through the weights_only loader), page cache warm for
both. Prints the hash rates of the candidates on one buffer, the medians, and the ratios
save / raw (the requirement: at least 0.5), save / plain and verify / load. All are wall-clock
times: on a machine whose cores are busy, DeepSpeed's CPU-bound serialization (it clones every
tensor, then pickles) slows down far more than the raw write.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def hash_rates(mib: int = 64) -> dict[str, float]:
    """MiB/s of each candidate checksum over one random buffer."""
    import xxhash

    buf = os.urandom(mib * MIB)
    candidates = {
        "xxh3_128 (used)": lambda: xxhash.xxh3_128(buf).digest(),
        "crc32 (zlib)": lambda: zlib.crc32(buf),
        "sha256": lambda: hashlib.sha256(buf).digest(),
        "blake2b": lambda: hashlib.blake2b(buf).digest(),
    }
    rates = {}
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        fn()
        rates[name] = mib / (time.perf_counter() - t0)
    return rates


def raw_write(path: Path, size: int) -> float:
    """Seconds to write ``size`` random bytes to ``path`` and fsync them."""
    chunk = os.urandom(8 * MIB)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def build(d_model: int, layers: int, experts: int):
    from omni_ds.config.experiment import ExperimentConfig
    from omni_ds.config.loading import from_dict
    from omni_ds.model.encoder import build_model
    from omni_ds.train.engine import build_engine

    model = {"vocab_size": 64, "d_model": d_model, "n_layers": layers, "n_heads": 4,
             "d_ff": 4 * d_model, "frontend": {"n_mels": 16},
             "moe": {"num_experts": experts, "ep_size": 1}}  # fmt: skip
    encoder = build_model(from_dict(ExperimentConfig, {"model": model}).model)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}  # fmt: skip
    engine = build_engine(encoder, ds)
    out = engine(torch.randn(1, 16000), torch.tensor([16000]))
    loss = encoder.loss(out, torch.ones(1, 3, dtype=torch.long), torch.tensor([3])).total
    engine.backward(loss)
    engine.step()
    return engine, sum(p.numel() for p in encoder.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=REPO)
    args = parser.parse_args()

    from omni_ds import dist
    from omni_ds.ckpt.saver import Checkpointer
    from omni_ds.ckpt.select import problems
    from omni_ds.config.train import CheckpointConfig

    for name, rate in hash_rates().items():
        print(f"hash {name}: {rate:,.0f} MiB/s (one core)")
    with dist.distributed(), tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run = Path(tmp)
        engine, params = build(args.d_model, args.layers, args.experts)
        ckpt = Checkpointer(engine, run, CheckpointConfig(keep_last=1), ep_size=1)
        checked = engine.checkpoint_engine
        raw, plain, save, size = [], [], [], 0
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            path = ckpt.save(step, {}, data_state=None)
            save.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.iterdir())
            raw.append(raw_write(run / "raw.bin", size))
            engine.checkpoint_engine = checked.inner
            t0 = time.perf_counter()
            engine.save_checkpoint(str(run / "plain"), tag="plain", save_latest=False)
            plain.append(time.perf_counter() - t0)
            engine.checkpoint_engine = checked
            shutil.rmtree(run / "plain")
        t0 = time.perf_counter()
        found = problems(path)
        verify_s = time.perf_counter() - t0
        assert not found, found
        t0 = time.perf_counter()
        ckpt.load(path)
        load_s = time.perf_counter() - t0
        files = len(list(path.iterdir()))

    raw_bw = size / statistics.median(raw) / MIB
    plain_bw = size / statistics.median(plain) / MIB
    save_bw = size / statistics.median(save) / MIB
    print(f"checkpoint: {params / 1e6:.1f}M parameters, {size / MIB:.0f} MiB in {files} files, "
          f"{args.repeats} saves")  # fmt: skip
    print(
        f"raw write + fsync: {raw_bw:,.0f} MiB/s (median of {', '.join(f'{s:.2f}' for s in raw)} s)"
    )
    print(f"DeepSpeed's plain save: {plain_bw:,.0f} MiB/s (median of "
          f"{', '.join(f'{s:.2f}' for s in plain)} s)")  # fmt: skip
    print(f"save (digest + fsync + manifest): {save_bw:,.0f} MiB/s (median of "
          f"{', '.join(f'{s:.2f}' for s in save)} s)")  # fmt: skip
    print(f"save / raw = {save_bw / raw_bw:.2f}, plain / raw = {plain_bw / raw_bw:.2f}, "
          f"save / plain = {save_bw / plain_bw:.2f}")  # fmt: skip
    print(f"verify {verify_s:.3f} s, load {load_s:.3f} s, verify / load = {verify_s / load_s:.2f}")


if __name__ == "__main__":
    main()
