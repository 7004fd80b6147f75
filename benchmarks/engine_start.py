"""Engine start-up: ``build_engine`` as omni-ds runs it vs DeepSpeed's stock path, measured in one
run.

    .venv/bin/python benchmarks/engine_start.py [--repeats 5] [--config configs/tiny.yaml]
        [--ds ds_configs/zero1_fp32.json]

Every ZeRO engine start imports DeepSpeed's Muon optimizer (``is_zero_supported_optimizer`` adds
it to the optimizers ZeRO accepts), and the ``torch.compile`` decorators of its kernels import
Inductor. omni-ds imports that module with the decorators as no-ops unless the JSON asks for
Muon (``omni_ds.train.engine._import_muon_uncompiled``). Each measurement is a fresh Python (one
rank, gloo or NCCL as ``omni_ds.dist`` picks) that builds the experiment's encoder and times
``build_engine`` alone; ``stock`` replaces the skip with nothing, i.e. DeepSpeed's own path. The
two are interleaved ``--repeats`` times so that other load hits both alike; prints the medians and
omni-ds / stock. What is saved is CPU time at every start (every rank of every job and requeue).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from omni_ds import dist
from omni_ds.config.experiment import load_config
from omni_ds.config.ds_json import read_ds_config
from omni_ds.model.encoder import build_model
from omni_ds.train import engine as engine_module

config, ds_path, variant = sys.argv[1:4]
if variant == "stock":
    engine_module._import_muon_uncompiled = lambda ds_config: None
with dist.distributed():
    model = build_model(load_config(config, ["model.moe.ep_size=1"]).model)
    monitors = (*engine_module.FILE_MONITORS, "wandb", "comet")  # no files, no runs
    ds = {k: v for k, v in read_ds_config(ds_path).items() if k not in monitors}
    start = time.perf_counter()
    engine_module.build_engine(model, ds)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "inductor": any(m == "torch._inductor.compile_fx"
                                                     for m in sys.modules)}))
"""


def start_once(config: Path, ds: Path, variant: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    out = subprocess.run([sys.executable, "-c", CHILD, str(config), str(ds), variant], env=env,
                         capture_output=True, text=True, check=True, cwd=REPO).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    parser.add_argument("--ds", type=Path, default=REPO / "ds_configs" / "zero1_fp32.json")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"omni-ds": [], "stock": []}
    for k in range(args.repeats):
        for variant in times:
            result = start_once(args.config, args.ds, variant)
            times[variant].append(result["seconds"])
            print(f"repeat {k + 1}/{args.repeats} {variant}: build_engine {result['seconds']:.2f} s,"
                  f" Inductor's compile_fx imported: {result['inductor']}", flush=True)  # fmt: skip
    medians = {v: statistics.median(t) for v, t in times.items()}
    print(f"\nbuild_engine, median of {args.repeats} fresh processes ({args.config.name}, "
          f"{args.ds.name}):")  # fmt: skip
    for variant, seconds in medians.items():
        print(f"  {variant:8s} {seconds:.2f} s")
    print(f"omni-ds / stock = {medians['omni-ds'] / medians['stock']:.2f}")


if __name__ == "__main__":
    main()
