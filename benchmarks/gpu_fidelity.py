"""Dense vs Switch vs omni on the embedded corpus for a fixed wall-clock budget each: the eval table.

    python3 benchmarks/gpu_fidelity.py --out /tmp/fidelity       # one GPU: 8 x 256, ~3 min
    .venv/bin/python benchmarks/gpu_fidelity.py --out /tmp/f --train-utterances 48 \\
        --d-model 32 --layers 2 --experts 4 --steps 1000 --train-seconds 0 --log-every 1  # toy

The method of ``omni-ds demo`` (its stage commands, from ``omni_ds.demo.stages``: ``omni-ds
synth``, a letter tokenizer, ``omni-ds train`` of ``configs/demo.yaml`` with ``model.moe.router``
dense / switch / omni, ``omni-ds export``, ``omni-ds eval`` on dev and the four shifted test sets),
one seed, with a GPU-sized encoder (``--layers`` blocks x ``--d-model``, FFN 4x, 8 experts) and
bf16 ZeRO-1 on CUDA (fp32 on the CPU). The three trainings run **at the same time**, one process
each (on one GPU they share it), so the three budgets fit in one: each trains to ``--steps`` (the
LR schedule's length) or until ``--train-seconds`` have passed, whichever comes first; the time
limit is a SIGUSR1, which ``omni-ds train`` answers with a checkpoint at the next step and exit 75.
The table says how many steps each reached (its last checkpoint). ``--json`` writes the summary: per model its steps,
wall time, last logged loss and the eval's ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_ds.demo.stages import ROUTERS, DemoSettings, stages  # noqa: E402
from omni_ds.train.signals import EXIT_REQUEUE  # noqa: E402

CLI = [sys.executable, "-m", "omni_ds.cli"]


def ds_config(path: Path, steps: int, lr: float, cuda: bool) -> Path:
    """ZeRO-1 AdamW (torch's, no JIT) with warm-up and linear decay to 0 at ``steps``; bf16 on CUDA."""
    warmup = max(1, min(100, steps // 10))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup,
            "total_num_steps": steps, "warmup_type": "linear"}},
        "zero_optimization": {"stage": 1},
    }  # fmt: skip
    if cuda:
        config["bf16"] = {"enabled": True}
    path.write_text(json.dumps(config, indent=1))
    return path


def run(argv: list[str], log: Path) -> None:
    run_all({"": argv}, {"": log})


def run_all(commands: dict[str, list[str]], logs: dict[str, Path]) -> None:
    """The commands side by side, each to its log; raises with a log's tail if one fails."""
    procs = {}
    for key, argv in commands.items():
        with open(logs[key], "w") as f:
            procs[key] = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    for key, p in procs.items():
        if p.wait():
            tail = "".join(logs[key].read_text().splitlines(keepends=True)[-20:])
            argv = " ".join(commands[key][:4])
            raise SystemExit(
                f"gpu_fidelity: {argv} ... failed (exit {p.returncode}); {logs[key]}:\n{tail}"
            )


def _has_trained(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and '"kind": "train"' in metrics.read_text()


def train_all(commands: dict[str, list[str]], out: Path, seconds: float, steps: int):
    """The trainings side by side; SIGUSR1 to those still training after ``seconds``."""
    procs, logs, start = {}, {}, time.perf_counter()
    for i, (router, argv) in enumerate(commands.items()):
        logs[router] = open(out / f"train_{router}.log", "w")
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(commands))),
               **os.environ, "MASTER_PORT": str(29600 + 10 * i + os.getpid() % 7)}  # fmt: skip
        procs[router] = subprocess.Popen(argv, stdout=logs[router], stderr=subprocess.STDOUT,
                                         env=env)  # fmt: skip
    signalled, wall = set(), {}
    while len(wall) < len(procs):
        late = time.perf_counter() - start > seconds
        for router, p in procs.items():
            if router in wall:
                continue
            if p.poll() is not None:
                wall[router] = time.perf_counter() - start
            # Only while it trains: after its first logged step (a stop before the first step
            # exits with nothing saved) and before the final checkpoint (after which the
            # handler is gone).
            elif late and router not in signalled and _has_trained(out / router):
                if not (out / router / "checkpoints" / f"step_{steps}").exists():
                    p.send_signal(signal.SIGUSR1)
                    signalled.add(router)
        time.sleep(0.5)
    result = {}
    for router, p in procs.items():
        logs[router].close()
        if p.returncode not in (0, EXIT_REQUEUE):
            tail = "".join(Path(logs[router].name).read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(
                f"gpu_fidelity: training {router} failed (exit {p.returncode}):\n{tail}"
            )
        lines = (out / router / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        latest_file = out / router / "checkpoints" / "latest"
        if not latest_file.exists():
            raise SystemExit(f"gpu_fidelity: training {router} left no checkpoint")
        latest = latest_file.read_text().strip()
        result[router] = {"steps": int(latest.removeprefix("step_")), "wall_s": wall[router],
                          "stopped_by_time": p.returncode == EXIT_REQUEUE,
                          "last_train_log": train[-1] if train else {}}  # fmt: skip
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-utterances", type=int, default=4800)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000, help="LR schedule length (upper bound)")
    ap.add_argument("--train-seconds", type=float, default=150.0, help="wall budget per training")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-seconds", type=float, default=160.0, help="audio seconds per batch")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings(out=args.out, steps=args.steps, train_utterances=args.train_utterances,
                            nproc=1, seeds=1)  # fmt: skip
    plan = {s.name: s for s in stages(settings)}
    t0 = time.perf_counter()
    for name in ("corpus", "tokenizer"):
        run(plan[name].argv, args.out / f"{name}.log")
    ds = ds_config(args.out / "ds_config.json", args.steps, args.lr, cuda)
    heads = max(1, args.d_model // 64)
    sizes = [
        f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
        f"model.n_heads={heads}", f"model.d_ff={4 * args.d_model}",
        f"model.moe.num_experts={args.experts}", f"deepspeed={ds}",
        "train.dev_every=0", "train.progress_bar=false", f"train.log_every={args.log_every}",
        "checkpoint.every_steps=0", f"data.max_batch_seconds={args.batch_seconds}",
        "data.dev={}",  # the eval below scores dev with the test sets
    ]  # fmt: skip
    commands = {}
    for router in ROUTERS:
        argv = plan[f"train_{router}"].argv
        # The demo launches through torchrun; one process each here, so SIGUSR1 reaches it.
        commands[router] = [
            *CLI,
            *argv[argv.index("train") :],
            *(a for s in sizes for a in ("--set", s)),
        ]
    t1 = time.perf_counter()
    trained = train_all(commands, args.out, args.train_seconds, args.steps)
    t2 = time.perf_counter()
    exports = {r: plan[f"export_{r}"].argv for r in ROUTERS}
    run_all(exports, {r: args.out / f"export_{r}.log" for r in ROUTERS})
    run([*plan["eval"].argv, *(["--device", "cuda"] if cuda else [])], args.out / "eval.log")
    phases = {"prepare_s": t1 - t0, "train_s": t2 - t1, "export_eval_s": time.perf_counter() - t2}
    report = json.loads((args.out / "eval" / "eval.json").read_text())
    table = (args.out / "eval" / "eval.md").read_text()
    print(f"corpus {args.train_utterances} train utterances; "
          f"encoder {args.layers} x {args.d_model}, {args.experts} experts, "
          f"{'bf16 on ' + torch.cuda.get_device_name() if cuda else 'fp32 on CPU'}")  # fmt: skip
    print(f"{'model':<8} {'steps':>6} {'wall s':>7} {'stopped by':>10} {'last loss':>10}")
    for router, r in trained.items():
        loss = r["last_train_log"].get("loss", float("nan"))
        print(f"{router:<8} {r['steps']:>6} {r['wall_s']:>7.0f} "
              f"{'time' if r['stopped_by_time'] else 'steps':>10} {loss:>10.3f}")  # fmt: skip
    print(table)
    print("phases: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in phases.items()))
    if args.json:
        summary = {"train_utterances": args.train_utterances, "d_model": args.d_model,
                   "layers": args.layers, "experts": args.experts, "steps_cap": args.steps,
                   "train_seconds": args.train_seconds, "phases": phases, "trained": trained,
                   "eval": report}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
