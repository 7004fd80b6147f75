"""Forward+backward time and peak memory of one MoE layer: DeepSpeed's stock dispatch vs the
padding-free grouped dispatch with each expert kernel (a loop over experts, ``torch._grouped_mm``).

    .venv/bin/python benchmarks/moe_layer.py                        # 4k/16k/32k tokens, fp32
    .venv/bin/python benchmarks/moe_layer.py --tokens 16384 --cpu-time   # on a busy machine
    python3 benchmarks/moe_layer.py --dtype bf16 --tokens 16384 65536    # one GPU (gpu_check.sh)

Every variant is ``omni_ds.model.moe.MoEFeedForward`` with the same weights, the same inputs and
the same routing (E=8, d=512, FFN 2048, top-1, dropless); they differ only in how the routed frames
reach the experts: ``stock`` runs DeepSpeed 0.19.8's ``MOELayer.forward`` (a dense
[E, capacity, d] buffer whose capacity is the busiest expert's count); ``loop`` and ``grouped_mm``
are ``dispatch: grouped`` (every expert on exactly its own frames) with ``expert_kernel: loop``
(one GEMM per expert) or ``grouped_mm`` (one ``torch._grouped_mm`` for all). (A bare
``deepspeed.moe.layer.MoE`` cannot be the baseline here: its top-1 dropless gating passes a tensor
as ``torch.topk``'s k and raises in 0.19.8.) Routing is ``balanced`` (random inputs) or
``skewed`` (inputs shifted so that expert 0 takes ~55% of the frames, like silence in speech).

Times: all variants in one process, one warm-up round, then ``--repeats`` alternating rounds; the
best round of each (on a shared machine drift and spikes hit all alike); on CUDA timed with CUDA
events. Peak memory of one more fwd+bwd of each, beyond what is allocated before it: on CUDA
``max_memory_allocated``; on the CPU the growth of the peak resident set (VmHWM, reset through
``/proc/self/clear_refs`` before each; glibc's mmap threshold fixed, so freed tensors leave the
resident set at once). The table gives ratios to ``stock`` and
the ``grouped_mm / loop`` ratio that ``expert_kernel: auto`` rests on; targets at 16k tokens:
skewed <= 0.3x time and <= 0.6x memory, balanced <= 1.0x time. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_ds.config.model import MoEConfig  # noqa: E402
from omni_ds.model.dispatch import grouped_mm_problem  # noqa: E402
from omni_ds.model.moe import MoEFeedForward  # noqa: E402
from omni_ds.model.router import Router  # noqa: E402

E, D, FF = 8, 512, 2048
KERNELS = ("stock", "loop", "grouped_mm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_CLOCK = time.perf_counter


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skewed_inputs(layer: MoEFeedForward, n: int, share: float, device) -> torch.Tensor:
    """Random frames shifted along router row 0 until expert 0 takes ``share`` of them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g).to(device)
    direction = layer.router.wg.weight[0].detach().float()
    direction = direction / direction.norm()
    lo, hi = 0.0, 10.0
    for _ in range(30):
        shift = (lo + hi) / 2
        taken = (layer.router.route(x + shift * direction).expert == 0).float().mean()
        lo, hi = (shift, hi) if taken < share else (lo, shift)
    return x + hi * direction


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _return_freed_memory() -> None:
    # glibc serves mid-sized blocks from a heap it keeps after free (its mmap threshold grows),
    # so the peak RSS would count freed memory; a fixed 64 KiB threshold (M_MMAP_THRESHOLD = -3)
    # returns every tensor to the OS when it is freed.
    ctypes.CDLL(None).mallopt(-3, 65536)


def build(
    kernel: str, routing: str, tokens: int, dtype: str
) -> tuple[MoEFeedForward, torch.Tensor]:
    """The layer (same weights for every variant: same seed) and its input [1, tokens, D]."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        router="switch", num_experts=E, top_k=1, dropless=True,
        dispatch="stock" if kernel == "stock" else "grouped",
        expert_kernel="auto" if kernel == "stock" else kernel,
    )  # fmt: skip
    layer = MoEFeedForward(cfg, D, FF, router=Router(cfg, D)).to(device())
    with torch.no_grad():
        if routing == "skewed":
            x = skewed_inputs(layer, tokens, 0.55, device())
        else:
            x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(0)).to(device())
    layer.to(DTYPES[dtype])
    return layer, x.to(DTYPES[dtype])[None].requires_grad_()


def step(layer: MoEFeedForward, x: torch.Tensor) -> float:
    """Seconds of one forward+backward (CUDA events on a GPU, ``CPU_CLOCK`` on the CPU)."""
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = CPU_CLOCK()
    layer(x).out.float().square().mean().backward()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return CPU_CLOCK() - t0


def available(kernels, dtype: str) -> tuple[list[str], dict[str, str]]:
    """The kernels that run here, and why each other one does not."""
    problem = grouped_mm_problem(device().type, device().index, DTYPES[dtype])
    skipped = {"grouped_mm": problem} if problem and "grouped_mm" in kernels else {}
    return [k for k in kernels if k not in skipped], skipped


def peak_bytes(layer: MoEFeedForward, x: torch.Tensor) -> float:
    """Peak bytes of one fwd+bwd beyond what is allocated before it."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(layer, x)
        return float(torch.cuda.max_memory_allocated() - before)
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set (VmHWM)
        f.write("5")
    before = _status_bytes("VmRSS")
    step(layer, x)
    return float(_status_bytes("VmHWM") - before)


def measure(routing: str, tokens: int, repeats: int, kernels, dtype: str) -> dict:
    """All variants in one process, alternating, so load drift hits all alike; best of N
    rounds; then the peak memory of one more fwd+bwd of each."""
    layers = {k: build(k, routing, tokens, dtype) for k in kernels}
    layer, x = layers[kernels[0]]
    busiest = torch.bincount(layer.router.route(x[0]).expert[:, 0], minlength=E).max()
    times = {k: [] for k in layers}
    for round_ in range(repeats + 1):  # round 0 warms up
        for k, (layer, x) in layers.items():
            seconds = step(layer, x)
            if round_:
                times[k].append(seconds)
    memory = {k: peak_bytes(layer, x) for k, (layer, x) in layers.items()}
    return {"routing": routing, "tokens": tokens, "busiest": float(busiest) / tokens,
            "seconds": {k: min(t) for k, t in times.items()}, "peak_bytes": memory}  # fmt: skip


def ratio(a: float, b: float) -> str:
    # Toy sizes can stay within one page of the resident set: nothing to divide by.
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def table(rows: list[dict], kernels) -> str:
    head = ["tokens", "routing", "busiest expert"]
    head += [f"{k} ms" for k in kernels] + [f"{k} peak MB" for k in kernels]
    head += [f"{k}/stock time" for k in kernels[1:]] + [f"{k}/stock mem" for k in kernels[1:]]
    if {"loop", "grouped_mm"} <= set(kernels):
        head.append("grouped_mm/loop time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, m = r["seconds"], r["peak_bytes"]
        cells = [str(r["tokens"]), r["routing"], f"{r['busiest']:.0%}"]
        cells += [f"{s[k] * 1e3:.2f}" for k in kernels] + [f"{m[k] / 2**20:.0f}" for k in kernels]
        cells += [ratio(s[k], s["stock"]) for k in kernels[1:]]
        cells += [ratio(m[k], m["stock"]) for k in kernels[1:]]
        if {"loop", "grouped_mm"} <= set(kernels):
            cells.append(ratio(s["grouped_mm"], s["loop"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    global CPU_CLOCK, D, FF
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--routing", nargs="+", choices=("balanced", "skewed"),
                        default=["balanced", "skewed"])  # fmt: skip
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS),
                        help="variants; the first is the ratios' baseline (stock)")  # fmt: skip
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--d-model", type=int, default=D, help=f"layer width (default {D})")
    parser.add_argument("--d-ff", type=int, default=FF, help=f"expert hidden width (default {FF})")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, process CPU seconds instead of wall seconds (robust on a shared machine)",
    )
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    if args.cpu_time:
        CPU_CLOCK = time.process_time
        torch.set_num_threads(1)
    if device().type == "cpu":
        _return_freed_memory()
    D, FF = args.d_model, args.d_ff
    kernels, skipped = available(args.kernels, args.dtype)
    if kernels[0] != "stock":
        parser.error("--kernels: stock must come first (the ratios' baseline)")
    rows = [
        measure(r, t, args.repeats, kernels, args.dtype) for t in args.tokens for r in args.routing
    ]
    where = (
        torch.cuda.get_device_name()
        if device().type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} seconds"
    )
    print(f"\nMoE layer fwd+bwd, E={E}, d={D}, FFN {FF}, top-1, dropless, {args.dtype} ({where}), "
          f"torch {torch.__version__}\n")  # fmt: skip
    print(table(rows, kernels))
    for kernel, why in skipped.items():
        print(f"{kernel}: not run: {why}")
    if args.json:
        summary = {"device": where, "dtype": args.dtype, "torch": torch.__version__, "d_model": D,
                   "d_ff": FF, "experts": E,
                   "kernels": kernels, "skipped": skipped, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
