"""The four parts of the one-GPU check, run in order with a shared time budget: one table, one
JSON summary, a non-zero exit if any part failed. Started by ``benchmarks/gpu_check.sh``, which
installs the carried wheels first; ``--cpu-smoke`` runs every part at toy sizes on the CPU.

1. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (on the GPU every test must pass: a skip
   is a failure there; in the smoke the GPU tests are only collected).
2. ``train_step``: ``benchmarks/router_step.py``: omni_8x84m, ``ds_configs/zero2_bf16.json``,
   omni vs Switch: step time, tokens/s, MFU against the matmul rate measured in the same run,
   peak memory.
3. ``moe_layer``: ``benchmarks/moe_layer.py --dtype bf16 --tokens 16384 65536``: stock vs
   loop vs ``torch._grouped_mm``, balanced and skewed, time and peak memory.
4. ``fidelity``: ``benchmarks/gpu_fidelity.py``: dense / Switch / omni, 8 blocks x 256, trained
   side by side for what is left of the budget (at most 150 s each), the eval table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 440.0
"""Wall seconds for the four parts on the GPU: 8 minutes less ~20 s of set-up and a margin."""
SMOKE_BUDGET_S = 600.0
"""The smoke's cap: it does ~50 CPU-seconds of work (6 min wall measured at a load average of 40)."""


NAMES = ("gpu_tests", "train_step", "moe_layer", "fidelity")


@dataclasses.dataclass
class Part:
    name: str
    argv: list[str]
    timeout_s: float
    json: Path | None = None
    """The part's own machine-readable result, embedded in the summary."""


def parts(smoke: bool, work: Path, out: Path, remaining) -> list:
    """The parts in order; ``remaining()`` gives the seconds left when a part starts."""
    py = sys.executable
    tests = [py, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    if smoke:
        tests += ["--collect-only", "-q"]
    else:
        (out / "gpu_tests.xml").unlink(missing_ok=True)  # never a report of an earlier run
        tests += ["-q", "--junitxml", str(out / "gpu_tests.xml")]
    step = [py, "benchmarks/router_step.py", "--json", str(work / "train_step.json")]
    if smoke:
        step += ["--config", "configs/tiny.yaml", "--batch", "2", "--seconds", "1",
                 "--steps", "1", "--rounds", "1", "--matmul-size", "128"]  # fmt: skip
    layer = [
        py,
        "benchmarks/moe_layer.py",
        "--dtype",
        "bf16",
        "--json",
        str(work / "moe_layer.json"),
    ]
    layer += (["--tokens", "256", "--d-model", "64", "--d-ff", "256", "--repeats", "1"]
              if smoke else ["--tokens", "16384", "65536"])  # fmt: skip

    def fidelity() -> Part:
        left = remaining()
        argv = [py, "benchmarks/gpu_fidelity.py", "--out", str(work / "fidelity"),
                "--json", str(work / "fidelity.json")]  # fmt: skip
        if smoke:  # stopped by the signal right after its first step: the time-limit path
            argv += ["--train-utterances", "24", "--d-model", "32", "--layers", "2",
                     "--experts", "4", "--steps", "1000", "--train-seconds", "0",
                     "--log-every", "1"]  # fmt: skip
        else:  # synthesis, start-up, export and eval take ~100 s around the trainings
            argv += ["--train-seconds", str(int(max(30.0, min(150.0, left - 110.0))))]
        return Part("fidelity", argv, max(left - 5.0, 60.0), work / "fidelity.json")

    return [
        Part("gpu_tests", tests, 150.0),
        Part("train_step", step, 150.0, work / "train_step.json"),
        Part("moe_layer", layer, 90.0, work / "moe_layer.json"),
        fidelity,
    ]


def run_part(part: Part, log) -> tuple[dict, str]:
    """Runs one part, its output appended to ``log`` and echoed; returns its record and output."""
    log.write(f"\n===== {part.name}: {' '.join(part.argv)}\n")
    log.flush()
    start = time.perf_counter()
    # Its own process group: a time-out ends the trainings a part started too (they hold the GPU).
    proc = subprocess.Popen(part.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=part.timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    seconds = time.perf_counter() - start
    log.write(output)
    log.flush()
    print(f"\n===== {part.name} ({seconds:.0f} s, exit {code})")
    print("\n".join(output.rstrip().splitlines()[-40:]), flush=True)
    record = {"status": "ok" if code == 0 else "timeout" if code is None else "failed",
              "exit": code, "seconds": round(seconds, 1), "timeout_s": part.timeout_s}  # fmt: skip
    if part.json is not None and part.json.exists():
        record["result"] = json.loads(part.json.read_text())
    elif part.json is not None and code == 0:
        record["status"], record["error"] = "failed", f"{part.json.name} was not written"
    if code is not None and code != 0:
        record["error"] = "\n".join(output.rstrip().splitlines()[-15:])
    return record, output


def check_tests(record: dict, output: str, smoke: bool, out: Path) -> None:
    """On the GPU every GPU test passes and none is skipped; in the smoke they are collected."""
    if smoke:
        collected = [line for line in output.splitlines() if "::" in line]
        record["result"] = {"collected": len(collected)}
        if record["status"] == "ok" and not collected:
            record["status"], record["error"] = "failed", "no GPU test collected"
        return
    junit = out / "gpu_tests.xml"
    if not junit.exists():
        return
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    record["result"] = counts
    if counts["skipped"] or counts["failures"] or counts["errors"] or not counts["passed"]:
        record["status"] = "failed"
        record.setdefault("error", f"GPU tests: {counts}")


def summary_cell(name: str, record: dict) -> str:
    r = record.get("result")
    if not r:
        return record.get("error", "").splitlines()[-1][:120] if record.get("error") else ""
    if name == "gpu_tests":
        return ", ".join(f"{v} {k}" for k, v in r.items())
    if name == "train_step":
        cells = [f"{k}: {v['step_s'] * 1e3:.1f} ms, {v['tokens_per_s']:.0f} tok/s, MFU "
                 f"{v['mfu']:.1%}, peak {v['peak_bytes'] / 1e9:.2f} GB"
                 for k, v in r["routers"].items()]  # fmt: skip
        return "; ".join(cells) + (f"; omni/switch {r['omni_over_switch']:.3f}x; matmul "
                                   f"{r['matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    if name == "moe_layer":
        cells = []
        for row in r["rows"]:
            s, m = row["seconds"], row["peak_bytes"]
            cell = f"{row['tokens']} {row['routing']}: " + " ".join(
                f"{k} {s[k] * 1e3:.1f} ms/{m[k] / 2**20:.0f} MB" for k in s
            )
            if "grouped_mm" in s:
                cell += f" (grouped_mm/loop {s['grouped_mm'] / s['loop']:.2f}x)"
            cells.append(cell)
        return "; ".join(cells)
    if name == "fidelity":
        wer = {m["model"]: m.get("mean_wer") for m in r["eval"].get("models", [])}
        return "; ".join(
            f"{k}: {v['steps']} steps, mean WER "
            + (f"{wer[k]:.1%}" if isinstance(wer.get(k), float) else "?")
            for k, v in r["trained"].items()
        )
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on the CPU")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check",
                    help="gpu_check.json, gpu_check.log (and gpu_tests.xml) go here")  # fmt: skip
    ap.add_argument(
        "--work",
        type=Path,
        help="scratch: corpus, runs, models (default: a new "
        "temporary directory; OUT keeps only the summary, the log and the test report)",
    )
    ap.add_argument("--parts", help=f"comma-separated subset to (re)run, of {','.join(NAMES)}")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    wanted = NAMES if not args.parts else tuple(args.parts.split(","))
    if set(wanted) - set(NAMES):
        ap.error(f"--parts: {','.join(sorted(set(wanted) - set(NAMES)))}: use names of {NAMES}")
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-smoke for the CPU rehearsal", file=sys.stderr)
        return 2
    out = args.out.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="omni-ds-gpu-check-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budget = SMOKE_BUDGET_S if smoke else BUDGET_S
    start = time.perf_counter()

    def remaining() -> float:
        return budget - (time.perf_counter() - start)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "CPU"
    summary = {"mode": "cpu-smoke" if smoke else "gpu", "device": device,
               "torch": torch.__version__, "python": sys.version.split()[0],
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "parts": {}}  # fmt: skip
    log_path = out / "gpu_check.log"
    with open(log_path, "w") as log:
        for part in parts(smoke, work, out, remaining):
            part = part() if callable(part) else part
            if part.name not in wanted:
                continue
            part.timeout_s = max(1.0, min(part.timeout_s, remaining()))
            record, output = run_part(part, log)
            if part.name == "gpu_tests":
                check_tests(record, output, smoke, out)
            summary["parts"][part.name] = record
            (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(f"\ngpu_check ({summary['mode']}, {device}, torch {torch.__version__}, "
          f"{summary['seconds']:.0f} s); summary {out / 'gpu_check.json'}\n")  # fmt: skip
    print("| part | status | seconds | result |\n|---|---|---|---|")
    for name, record in summary["parts"].items():
        print(f"| {name} | {record['status']} | {record['seconds']:.0f} | "
              f"{summary_cell(name, record)} |")  # fmt: skip
    failed = [n for n, r in summary["parts"].items() if r["status"] != "ok"]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
