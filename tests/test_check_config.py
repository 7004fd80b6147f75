"""omni-ds check-config: every error class shows its key, value and fix; the shipped configs pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_loader import write_corpus

from omni_ds.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module", autouse=True)
def corpus(tmp_path_factory) -> Path:
    """A small real corpus (shards + tokenizer): the checks read the data too."""
    global CORPUS
    CORPUS = write_corpus(tmp_path_factory.mktemp("corpus"), (8,), vocab=32)
    return CORPUS


def _experiment(tmp_path: Path, ds: dict | None = None, *, whole=False, **sections) -> Path:
    """configs/tiny.yaml on :data:`CORPUS` with ``sections`` merged in; its DeepSpeed JSON is
    zero2_bf16.json updated with ``ds`` (or ``ds`` alone when ``whole``)."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    base = {} if whole else json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())
    base.update(ds or {})
    (tmp_path / "ds.json").write_text(json.dumps(base))
    data["deepspeed"] = str(tmp_path / "ds.json")
    data["data"].update(
        train=[str(CORPUS)], dev={"dev": str(CORPUS)}, tokenizer=str(CORPUS / "tokenizer.model")
    )
    data.setdefault("train", {})["max_steps"] = 100
    for name, value in sections.items():
        data.setdefault(name, {}).update(value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _check(capsys, path: Path, *extra: str) -> tuple[int, str]:
    code = main(["check-config", str(path), *extra])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("ds_json", SHIPPED, ids=lambda p: p.name)
def test_shipped_deepspeed_configs_pass(tmp_path, capsys, ds_json):
    ds = json.loads(ds_json.read_text())
    path = _experiment(tmp_path, ds, whole=True)
    code, out = _check(capsys, path, "--world-size", "2", "--device", "cuda")
    assert code == 0, out
    assert "OK for world size 2" in out


def test_unknown_yaml_key_suggests_the_right_one(tmp_path, capsys):
    code, out = _check(capsys, _experiment(tmp_path, train={"max_step": 5}))
    assert code == 2
    assert "train.max_step: unknown key; did you mean 'max_steps'?" in out


def test_unknown_deepspeed_top_level_key_suggests_the_right_one(tmp_path, capsys):
    code, out = _check(capsys, _experiment(tmp_path, {"gradient_clippng": 1.0}))
    assert code == 2
    assert "gradient_clippng: unknown DeepSpeed key; did you mean 'gradient_clipping'?" in out


def test_unknown_nested_deepspeed_key_suggests_the_right_one(tmp_path, capsys):
    ds = {
        "zero_optimization": {"stage": 2, "overlap_com": False},
        "tensorboard": {"enabled": True, "output_pth": "tb"},
    }
    code, out = _check(capsys, _experiment(tmp_path, ds))
    assert code == 2
    assert (
        "zero_optimization.overlap_com: unknown DeepSpeed key; did you mean 'overlap_comm'?" in out
    )
    assert "tensorboard.output_pth: unknown DeepSpeed key; did you mean 'output_path'?" in out


def test_invalid_deepspeed_value_is_named(tmp_path, capsys):
    code, out = _check(capsys, _experiment(tmp_path, {"zero_optimization": {"stage": "two"}}))
    assert code == 2
    assert "zero_optimization.stage: 'two' is invalid" in out


def test_batch_size_arithmetic(tmp_path, capsys):
    ds = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
    }
    code, out = _check(capsys, _experiment(tmp_path, ds), "--world-size", "2")
    assert code == 2
    assert (
        "train_batch_size: 8 != train_micro_batch_size_per_gpu (1) × gradient_accumulation_steps "
        "(2) × data-parallel size (2) = 4; set train_batch_size to 4" in out
    )
    code, out = _check(capsys, _experiment(tmp_path, ds), "--world-size", "4")
    assert code == 0, out


def test_zero3_with_moe_is_refused(tmp_path, capsys):
    code, out = _check(capsys, _experiment(tmp_path, {"zero_optimization": {"stage": 3}}))
    assert code == 2
    assert "zero_optimization.stage: 3 with MoE (model.moe.router = 'omni')" in out
    assert "use stage 2" in out


def test_ep_size_must_divide_world_size(tmp_path, capsys):
    code, out = _check(
        capsys, _experiment(tmp_path), "--world-size", "3", "--set", "model.moe.ep_size=2"
    )
    assert code == 2
    assert "model.moe.ep_size: 2 does not divide the world size (3)" in out


def test_ep_size_must_divide_expert_count(tmp_path, capsys):
    code, out = _check(capsys, _experiment(tmp_path), "--set", "model.moe.ep_size=3")
    assert code == 2
    assert "moe.ep_size = 3: use a divisor of num_experts (4)" in out


def test_precision_conflicts(tmp_path, capsys):
    ds = {"fp16": {"enabled": True, "loss_scale": 128}, "bf16": {"enabled": True}}
    code, out = _check(capsys, _experiment(tmp_path, ds))
    assert code == 2
    assert "fp16.enabled and bf16.enabled: both true; enable one of them" in out
    assert "fp16.loss_scale: 128 is a static scale; set it to 0 for dynamic loss scaling" in out
    ds = {"torch_autocast": {"enabled": True}}
    code, out = _check(capsys, _experiment(tmp_path, ds))
    assert "torch_autocast.enabled: true together with bf16.enabled" in out


def test_stage0_clipping_with_expert_parallelism_is_refused(tmp_path, capsys):
    ds = {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}
    path = _experiment(tmp_path, ds)
    code, out = _check(capsys, path, "--world-size", "2", "--set", "model.moe.ep_size=2")
    assert code == 2
    assert "DeepSpeed issue 8475" in out and "use ZeRO stage 1 or 2, or gradient_clipping: 0" in out


def test_offload_with_torch_adam_needs_force_off(tmp_path, capsys):
    ds = json.loads((REPO / "ds_configs" / "zero2_cpu_offload.json").read_text())
    del ds["zero_force_ds_cpu_optimizer"]
    code, out = _check(capsys, _experiment(tmp_path, ds, whole=True))
    assert code == 2
    assert "set zero_force_ds_cpu_optimizer: false" in out


def test_schedule_shorter_than_training(tmp_path, capsys):
    path = _experiment(tmp_path)
    code, out = _check(capsys, path, "--set", "train.max_steps=5000")
    assert code == 2
    assert "scheduler.params.total_num_steps: 1000 < train.max_steps (5000)" in out


def test_missing_files(tmp_path, capsys):
    path = _experiment(tmp_path)
    code, out = _check(capsys, path, "--set", "deepspeed=ds_configs/zero9.json")
    assert code == 2
    assert "deepspeed: 'ds_configs/zero9.json' does not exist" in out
    code, out = _check(capsys, path, "--set", "data.tokenizer=nowhere/sp.model")
    assert "data.tokenizer: 'nowhere/sp.model' does not exist; check the path" in out
    code, out = _check(capsys, tmp_path / "nope.yaml")
    assert code == 2
    assert "nope.yaml' is neither a file nor a shipped preset" in out and "omni_8x84m" in out


def test_all_problems_are_reported_together(tmp_path, capsys):
    ds = {"gradient_clippng": 1.0, "zero_optimization": {"stage": 3}}
    code, out = _check(capsys, _experiment(tmp_path, ds), "--world-size", "2")
    assert code == 2
    assert "2 problem(s)" in out
