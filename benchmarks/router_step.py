"""Training step of omni vs Switch under DeepSpeed: step time, tokens/s, MFU, peak memory.

    python3 benchmarks/router_step.py                  # omni_8x84m, ds_configs/zero2_bf16.json
    .venv/bin/python benchmarks/router_step.py --config configs/tiny.yaml --batch 4 --seconds 2

The config's model is built twice, with ``model.moe.router`` omni and switch (same seed), each
wrapped by ``omni_ds.train.engine.build_engine`` exactly as ``omni-ds train`` wraps it, and both
train on the same fixed batches of synthetic audio; rounds alternate between the two engines so
drift hits both. Per router: the median step time, target tokens/s and encoder frames/s, the MFU
(``omni_ds.train.metrics.step_flops``: 6 x active parameters per real frame plus attention, over
the median step time) against the matmul rate **measured in the same process** (a square
``--matmul-size`` product in the training dtype, mean of 10 after 3 warm-ups; the datasheet rate
is printed beside it), and the peak memory of its steps (CUDA: ``max_memory_allocated``, less what
the other engine holds; CPU: the peak resident set's growth). Targets (one H200, bf16): MFU >= 40%,
omni / Switch step time within 2%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import engine_step, synthetic_batches, timed  # noqa: E402

from omni_ds import dist  # noqa: E402
from omni_ds.config.experiment import load_config  # noqa: E402
from omni_ds.model.encoder import build_model  # noqa: E402
from omni_ds.train.engine import build_engine  # noqa: E402
from omni_ds.train.metrics import peak_tflops, step_flops  # noqa: E402

ROUTERS = ("omni", "switch")


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The rate of an n x n x n product on random data: mean of 10 after 3 warm-ups."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        seconds = time.perf_counter() - t0
    return 10 * 2 * n**3 / seconds / 1e12


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def allocated(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _status_bytes("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM
            f.write("5")


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/omni_8x84m.yaml")
    ap.add_argument("--ds", default="ds_configs/zero2_bf16.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=64, help="utterances per step")
    ap.add_argument("--seconds", type=float, default=16.0, help="longest utterance, seconds")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()

    info = dist.init_distributed()
    device = info.device
    cfg = load_config(args.config, args.overrides)
    ds = json.loads(Path(args.ds).read_text())
    ds.pop("tensorboard", None)  # no run directory here
    bf16 = bool((ds.get("bf16") or {}).get("enabled"))
    fp16 = bool((ds.get("fp16") or {}).get("enabled"))
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    measured = matmul_tflops(device, dtype, args.matmul_size)
    batches = synthetic_batches(4, args.batch, args.seconds, cfg.model.vocab_size, device)

    base = allocated(device)
    engines, static = {}, {}
    for router in ROUTERS:
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(
            cfg.model, moe=dataclasses.replace(cfg.model.moe, router=router)
        )
        engine = build_engine(build_model(model_cfg).to(device), ds)
        timed(lambda b, e=engine: engine_step(e, b), batches, 2)  # warm-up: allocator, lazy init
        engines[router] = engine
        static[router] = allocated(device) - base - sum(static.values())
    times = {r: [] for r in ROUTERS}
    peaks = {r: 0 for r in ROUTERS}
    for _ in range(args.rounds):
        for router, engine in engines.items():
            reset_peak(device)
            times[router] += timed(lambda b, e=engine: engine_step(e, b), batches, args.steps)
            other = sum(v for r, v in static.items() if r != router)
            peaks[router] = max(peaks[router], peak(device) - base - other)

    rows = {}
    tokens = statistics.mean(float(b["token_lens"].sum()) for b in batches)
    for router, engine in engines.items():
        with torch.no_grad():
            out_lens = [engine.module(b["audio"], b["audio_lens"]).out_lens for b in batches]
        active = engine.module.parameter_counts()[1]
        flops = statistics.mean(
            step_flops(active, cfg.model.n_layers, cfg.model.d_model, lens) for lens in out_lens
        )
        frames = statistics.mean(float(lens.sum()) for lens in out_lens)
        t = statistics.median(times[router])
        rows[router] = {
            "step_s": t, "tokens_per_s": tokens / t, "frames_per_s": frames / t,
            "mfu": flops / t / (measured * 1e12), "peak_bytes": peaks[router],
            "active_params": active, "total_params": engine.module.parameter_counts()[0],
        }  # fmt: skip
    ratio = rows["omni"]["step_s"] / rows["switch"]["step_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; matmul {args.matmul_size}^3 {str(dtype)[6:]}: {measured:.1f} TFLOP/s "
          f"measured (datasheet/table {peak_tflops(device):.1f})")  # fmt: skip
    print(f"model {args.config}, DeepSpeed {args.ds}, batch {args.batch} x <= {args.seconds:g} s")
    print(
        f"{'router':<8} {'step ms':>9} {'tokens/s':>10} {'frames/s':>10} {'MFU':>7} {'peak GB':>8}"
    )
    for router, r in rows.items():
        print(f"{router:<8} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['frames_per_s']:>10.0f} {r['mfu']:>7.1%} {r['peak_bytes'] / 1e9:>8.2f}")  # fmt: skip
    print(f"omni / switch step time: {ratio:.3f}x (target within 2%)")
    if args.json:
        summary = {"device": name, "config": args.config, "ds": args.ds, "batch": args.batch,
                   "seconds": args.seconds, "dtype": str(dtype)[6:],
                   "matmul_tflops": measured, "omni_over_switch": ratio, "routers": rows}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
