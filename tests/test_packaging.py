"""The wheel carries the presets, DeepSpeed JSONs and SLURM scripts, and an install of it (a
fresh virtualenv outside the repository) submits a job and checks a preset by name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_loader import write_corpus

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("configs", "ds_configs", "slurm")


def _source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored): a clean tree to
    build from, so the test leaves no build/ or egg-info behind in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with only the omni-ds wheel installed; its dependencies come from this
    interpreter's site-packages (a .pth line), so nothing is downloaded."""
    root = tmp_path_factory.mktemp("wheel")
    source = _source_copy(root / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
                    str(source)], check=True, timeout=300)  # fmt: skip
    (wheel,) = (root / "dist").glob("omni_ds-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)  # fmt: skip
    return venv


def _omni_ds(venv: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    return subprocess.run([str(venv / "bin" / "omni-ds"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_wheel_ships_presets_and_submits_and_checks_them_by_name(installed, tmp_path):
    site = next(installed.glob("lib/python*/site-packages"))
    for folder in SHIPPED:
        shipped = sorted(p.name for p in (site / "omni_ds" / folder).iterdir())
        in_repo = sorted(p.name for p in (REPO / folder).iterdir() if not p.name.startswith("."))
        assert shipped == in_repo, folder
    # a directory of a user's own with a small corpus, no checkout
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus", (8,), vocab=32)
    data = ["--set", "data.train=[corpus]", "--set", "data.dev={dev: corpus}",
            "--set", "data.tokenizer=corpus/tokenizer.model"]  # fmt: skip
    assert corpus.is_dir()

    out = _omni_ds(installed, tmp_path, "submit", "--dry-run", "omni_8x84m", "--nodes", "2", *data)
    assert out.returncode == 0, out.stderr
    command = out.stdout.split()
    assert command[:4] == ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1"]
    script = command.index(str(site / "omni_ds" / "slurm" / "train.sbatch"))
    assert command[script + 1] == str(site / "omni_ds" / "configs" / "omni_8x84m.yaml")

    out = _omni_ds(installed, tmp_path, "check-config", "omni_8x84m", "--world-size", "2", *data)
    assert out.returncode == 0, out.stdout + out.stderr
    # ... which found the preset's "deepspeed: ds_configs/zero2_bf16.json" among the shipped
    # JSONs: this directory has no ds_configs/
    assert "omni_8x84m: OK for world size 2" in out.stdout
