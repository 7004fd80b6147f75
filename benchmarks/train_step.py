"""Step time of omni-ds's DeepSpeed engine vs a plain PyTorch loop on the same model and batches.

    .venv/bin/python benchmarks/train_step.py                       # tiny model, fp32, CPU
    .venv/bin/python benchmarks/train_step.py --config configs/omni_8x84m.yaml \\
        --ds ds_configs/zero2_bf16.json --batch 16 --seconds 15     # one GPU, bf16

Both loops train the same freshly built model (same weights) on the same fixed batches of
synthetic audio: the engine through ``omni_ds.engine.build_engine`` exactly as ``omni-ds train``
builds it (MoE parameter groups, optimizer and clipping from the JSON); the baseline with
``torch.optim.AdamW``, ``clip_grad_norm_`` and, when the JSON enables bf16, autocast. Rounds
alternate between the two so drift in machine load hits both; the median step time of each is
reported with the ratio engine / plain (DeepSpeed's overhead; target ≤ 1.10), tokens/s and the
estimated MFU (``omni_ds.metrics``: 6 × active parameters per encoder frame + attention).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_ds import dist  # noqa: E402
from omni_ds.config.ds_json import read_ds_config  # noqa: E402
from omni_ds.config.experiment import load_config  # noqa: E402
from omni_ds.model.encoder import build_model  # noqa: E402
from omni_ds.train.engine import build_engine  # noqa: E402
from omni_ds.train.metrics import peak_tflops, step_flops  # noqa: E402


def synthetic_batches(n: int, batch: int, seconds: float, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        samples = int(seconds * 16000)
        lens = torch.randint(samples // 2, samples + 1, (batch,), generator=g)
        lens[0] = samples
        audio = torch.randn(batch, samples, generator=g) * 0.1
        audio *= torch.arange(samples)[None] < lens[:, None]
        token_lens = (lens // 16000 * 4).clamp_min(1)
        tokens = torch.randint(0, vocab, (batch, int(token_lens.max())), generator=g)
        out.append(
            {
                "audio": audio.to(device),
                "audio_lens": lens.to(device),
                "tokens": tokens.to(device),
                "token_lens": token_lens.to(device),
            }
        )
    return out


def engine_step(engine, batch) -> None:
    out = engine(batch["audio"], batch["audio_lens"])
    loss = engine.module.loss(out, batch["tokens"], batch["token_lens"]).total
    engine.backward(loss)
    engine.step()


def plain_step(model, optimizer, clip: float, bf16: bool, batch) -> None:
    with torch.autocast(batch["audio"].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["audio"], batch["audio_lens"])
        loss = model.loss(out, batch["tokens"], batch["token_lens"]).total
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, batches, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(batches[i % len(batches)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--ds", default="ds_configs/zero1_fp32.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0, help="longest utterance, seconds")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    info = dist.init_distributed()
    cfg = load_config(args.config, args.overrides)
    ds = read_ds_config(args.ds)
    ds.pop("tensorboard", None)  # no run directory here
    bf16 = bool((ds.get("bf16") or {}).get("enabled"))
    opt = ds["optimizer"]["params"]
    torch.manual_seed(0)
    model = build_model(cfg.model).to(info.device)
    plain = copy.deepcopy(model)
    engine = build_engine(model, ds)
    optimizer = torch.optim.AdamW(
        plain.parameters(), lr=opt["lr"], betas=opt["betas"], eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )  # fmt: skip
    batches = synthetic_batches(4, args.batch, args.seconds, cfg.model.vocab_size, info.device)
    clip = float(ds.get("gradient_clipping", 0.0))

    def run_plain(b):
        plain_step(plain, optimizer, clip, bf16, b)

    def run_engine(b):
        engine_step(engine, b)

    for fn in (run_plain, run_engine):  # warm-up: allocator, autotuning, lazy init
        timed(fn, batches, 2)
    plain_times, engine_times = [], []
    for _ in range(args.rounds):
        plain_times += timed(run_plain, batches, args.steps)
        engine_times += timed(run_engine, batches, args.steps)
    t_plain, t_engine = statistics.median(plain_times), statistics.median(engine_times)

    with torch.no_grad():
        out_lens = [engine.module(b["audio"], b["audio_lens"]).out_lens for b in batches]
    active = engine.module.parameter_counts()[1]
    flops = statistics.mean(
        step_flops(active, cfg.model.n_layers, cfg.model.d_model, lens) for lens in out_lens
    )
    tokens = statistics.mean(float(b["token_lens"].sum()) for b in batches)
    peak = peak_tflops(info.device)
    device = torch.cuda.get_device_name() if info.device.type == "cuda" else "CPU"
    print(f"device {device}, {torch.get_num_threads()} threads, peak {peak:.2f} TFLOP/s")
    print(
        f"model {args.config} ({active / 1e6:.2f}M active params), DeepSpeed {args.ds} "
        f"({'bf16' if bf16 else 'fp32'}), batch {args.batch} × ≤{args.seconds:.0f} s"
    )
    print(f"{'loop':<8} {'step ms':>9} {'tokens/s':>10} {'frames/s':>10} {'MFU':>7}")
    frames = statistics.mean(float(lens.sum()) for lens in out_lens)
    for name, t in (("plain", t_plain), ("engine", t_engine)):
        mfu = flops / t / (peak * 1e12) if peak else 0.0
        print(f"{name:<8} {t * 1e3:>9.1f} {tokens / t:>10.0f} {frames / t:>10.0f} {mfu:>7.2%}")
    print(f"engine / plain step time: {t_engine / t_plain:.3f}x (target <= 1.10)")
    dist.shutdown()


if __name__ == "__main__":
    main()
