"""benchmarks/gpu_check.sh: the one-GPU check cannot rot while no GPU is there.

``--cpu-smoke`` runs all four parts at toy sizes on the CPU through the same scripts, commands and
summary as on the GPU; the part runner's failure paths (exit code, time-out, missing result, a
skipped GPU test) each make the check fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_the_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=720,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = summary["parts"]
    assert summary["mode"] == "cpu-smoke" and list(parts) == [
        "gpu_tests", "train_step", "moe_layer", "fidelity"
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in parts.values()), parts
    assert parts["gpu_tests"]["result"]["collected"] >= 10
    step = parts["train_step"]["result"]
    for router in ("omni", "switch"):
        r = step["routers"][router]
        assert r["step_s"] > 0 and 0 < r["mfu"] and r["peak_bytes"] > 0 and r["tokens_per_s"] > 0
    assert step["matmul_tflops"] > 0 and step["omni_over_switch"] > 0
    layer = parts["moe_layer"]["result"]
    assert [(r["routing"], r["tokens"]) for r in layer["rows"]] == [
        ("balanced", 256),
        ("skewed", 256),
    ]
    assert all(set(r["seconds"]) == {"stock", "loop", "grouped_mm"} for r in layer["rows"])
    fidelity = parts["fidelity"]["result"]
    assert set(fidelity["trained"]) == {"dense", "switch", "omni"}
    # Stopped by the time limit (SIGUSR1 -> checkpoint -> exit 75), as the GPU run's budget does.
    assert all(t["steps"] >= 1 and t["stopped_by_time"] for t in fidelity["trained"].values())
    assert [m["model"] for m in fidelity["eval"]["models"]] == ["dense", "switch", "omni"]
    table = proc.stdout[proc.stdout.index("| part | status |") :]
    assert all(f"| {name} | ok |" in table for name in parts)


def _part(tmp_path, code: str, timeout: float = 60.0, result: bool = False) -> dict:
    out = tmp_path / "result.json"
    part = gpu_check.Part("p", [sys.executable, "-c", code], timeout, out if result else None)
    with open(tmp_path / "log", "a") as log:
        record, _ = gpu_check.run_part(part, log)
    return record


def test_a_part_fails_on_its_exit_code_a_timeout_or_a_missing_result(tmp_path):
    assert _part(tmp_path, "print('fine')")["status"] == "ok"
    failed = _part(tmp_path, "import sys; print('boom'); sys.exit(3)")
    assert failed["status"] == "failed" and failed["exit"] == 3 and "boom" in failed["error"]
    assert _part(tmp_path, "import time; time.sleep(30)", timeout=1.0)["status"] == "timeout"
    missing = _part(tmp_path, "print('no json')", result=True)
    assert missing["status"] == "failed" and "not written" in missing["error"]


@pytest.mark.parametrize(
    "counts, status",
    [({"tests": 11, "skipped": 0}, "ok"), ({"tests": 11, "skipped": 1}, "failed"),
     ({"tests": 11, "failures": 1}, "failed"), ({"tests": 0}, "failed")],
)  # fmt: skip
def test_on_the_gpu_every_gpu_test_must_pass_and_none_be_skipped(tmp_path, counts, status):
    attrs = " ".join(f'{k}="{v}"' for k, v in counts.items())
    (tmp_path / "gpu_tests.xml").write_text(f"<testsuites><testsuite {attrs}/></testsuites>")
    record = {"status": "ok"}
    gpu_check.check_tests(record, "", smoke=False, out=tmp_path)
    assert record["status"] == status, record
