"""Forward+backward time and peak memory of one MoE layer: grouped dispatch vs DeepSpeed's stock.

    .venv/bin/python benchmarks/moe_layer.py                        # 4k/16k/32k tokens
    .venv/bin/python benchmarks/moe_layer.py --tokens 16384 --cpu-time   # on a busy machine

Both sides are ``omni_ds.moe.MoEFeedForward`` with the same weights, the same inputs and the
same routing (E=8, d=512, FFN 2048, top-1, dropless); they differ only in ``dispatch``: ``stock``
runs DeepSpeed 0.19.8's ``MOELayer.forward`` (a dense [E, capacity, d] buffer whose capacity is
the busiest expert's count), ``grouped`` runs every expert on exactly its own frames. (A bare
``deepspeed.moe.layer.MoE`` cannot be the baseline here: its top-1 dropless gating passes a tensor
as ``torch.topk``'s k and raises in 0.19.8.) Routing is ``balanced`` (random inputs) or
``skewed`` (inputs shifted so that expert 0 takes ~55% of the frames, like silence in speech).

Times: both dispatches in one fresh process, one warm-up round, then ``--repeats`` alternating
rounds; the best round of each (the machine is shared: drift and spikes hit both alike). Peak
memory: one fwd+bwd per fresh process, so it is the layer's alone: on CUDA
``max_memory_allocated``, on the CPU the growth of the peak resident set over the size before
(with glibc's mmap threshold fixed, so freed tensors leave the resident set at once). The table gives
grouped / stock ratios; targets at 16k tokens: skewed <= 0.3x time and <= 0.6x memory, balanced
<= 1.0x time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_ds.config.model import MoEConfig  # noqa: E402
from omni_ds.model.moe import MoEFeedForward  # noqa: E402
from omni_ds.model.router import Router  # noqa: E402

E, D, FF = 8, 512, 2048
CLOCK = time.perf_counter


def skewed_inputs(layer: MoEFeedForward, n: int, share: float, device) -> torch.Tensor:
    """Random frames shifted along router row 0 until expert 0 takes ``share`` of them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g).to(device)
    direction = layer.router.wg.weight[0].detach()
    direction = direction / direction.norm()
    lo, hi = 0.0, 10.0
    for _ in range(30):
        shift = (lo + hi) / 2
        taken = (layer.router.route(x + shift * direction).expert == 0).float().mean()
        lo, hi = (shift, hi) if taken < share else (lo, shift)
    return x + hi * direction


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(dispatch: str, routing: str, tokens: int, device) -> tuple[MoEFeedForward, torch.Tensor]:
    """The layer (same weights for either dispatch: same seed) and its input [1, tokens, D]."""
    torch.manual_seed(0)
    cfg = MoEConfig(router="switch", num_experts=E, top_k=1, dropless=True, dispatch=dispatch)
    layer = MoEFeedForward(cfg, D, FF, router=Router(cfg, D)).to(device)
    with torch.no_grad():
        if routing == "skewed":
            x = skewed_inputs(layer, tokens, 0.55, device)
        else:
            x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(0)).to(device)
    return layer, x[None].requires_grad_()


def step(layer: MoEFeedForward, x: torch.Tensor) -> float:
    start = CLOCK()
    layer(x).out.square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return CLOCK() - start


def measure_time(routing: str, tokens: int, repeats: int) -> dict:
    """Both dispatches in one process, alternating, so load drift hits both alike; best of N."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = {d: build(d, routing, tokens, device) for d in ("stock", "grouped")}
    layer, x = layers["grouped"]
    busiest = torch.bincount(layer.router.route(x[0]).expert[:, 0], minlength=E).max()
    times = {d: [] for d in layers}
    for round_ in range(repeats + 1):  # round 0 warms up
        for d, (layer, x) in layers.items():
            seconds = step(layer, x)
            if round_:
                times[d].append(seconds)
    return {"busiest": float(busiest) / tokens, **{d: min(t) for d, t in times.items()}}


def measure_memory(dispatch: str, routing: str, tokens: int) -> float:
    """Peak bytes of one fwd+bwd beyond the layer and its input (run alone in its process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer, x = build(dispatch, routing, tokens, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(layer, x)
        return torch.cuda.max_memory_allocated() - before
    before = rss_bytes()
    step(layer, x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def _run(*argv: str):
    # glibc serves mid-sized blocks from a heap it keeps after free (its mmap threshold grows),
    # so the peak RSS would count freed memory; a fixed threshold returns every tensor to the OS.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [sys.executable, __file__, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, process CPU seconds instead of wall seconds (robust on a shared machine)",
    )
    parser.add_argument("--time", nargs=2, metavar=("ROUTING", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory", nargs=3, metavar=("DISPATCH", "ROUTING", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    if args.time:
        print(json.dumps(measure_time(args.time[0], int(args.time[1]), args.repeats)))
        return 0
    if args.memory:
        print(json.dumps(measure_memory(args.memory[0], args.memory[1], int(args.memory[2]))))
        return 0
    cases = [(r, t) for t in args.tokens for r in ("balanced", "skewed")]
    rows = []
    for routing, tokens in tqdm(cases, desc="cases"):
        flags = ["--cpu-time"] * args.cpu_time + ["--repeats", str(args.repeats)]
        timing = _run(*flags, "--time", routing, str(tokens))
        memory = {d: _run("--memory", d, routing, str(tokens)) for d in ("stock", "grouped")}
        rows.append((routing, tokens, timing, memory))
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} seconds"
    )
    print(f"\nMoE layer fwd+bwd, E={E}, d={D}, FFN {FF}, top-1, dropless, fp32 ({device})\n")
    print("| tokens | routing | busiest expert | stock s | grouped s | time ratio "
          "| stock peak MB | grouped peak MB | memory ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for routing, tokens, t, m in rows:
        print(
            f"| {tokens} | {routing} | {t['busiest']:.0%} | {t['stock']:.3f} | {t['grouped']:.3f} "
            f"| {t['grouped'] / t['stock']:.2f}x | {m['stock'] / 2**20:.0f} "
            f"| {m['grouped'] / 2**20:.0f} | {m['grouped'] / m['stock']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
