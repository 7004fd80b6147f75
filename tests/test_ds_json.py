"""DeepSpeed JSONs users bring: HJSON, "auto" values, batch keys, inert sections, monitors; and
what check-config must refuse before train starts ranks (one preflight function for both)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_check_config import _check, _experiment, corpus  # noqa: F401  (autouse fixture)

from omni_ds.config.checks import preflight
from omni_ds.config.ds_json import read_ds_config
from omni_ds.train.engine import ds_config_for_run

REPO = Path(__file__).resolve().parents[1]


def test_hjson_is_read_as_deepspeed_reads_it(tmp_path, capsys):
    ds = tmp_path / "ds.hjson"
    ds.write_text(
        "// comments, unquoted keys and trailing commas, as DeepSpeed accepts\n"
        "{\n  train_micro_batch_size_per_gpu: 1,  # micro batch = one loader batch\n"
        '  "gradient_accumulation_steps": 2,\n  zero_optimization: {stage: 1},\n}\n'
    )
    assert read_ds_config(ds) == {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 1},
    }
    code, out = _check(capsys, _experiment(tmp_path), "--set", f"deepspeed={ds}")
    assert code == 0, out
    ds.write_text('{"gradient_clipping": 1.0, "gradient_clipping": 2.0}')
    with pytest.raises(ValueError, match="Duplicate key"):
        read_ds_config(ds)


HF_STYLE = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": 10,
            "total_num_steps": "auto",
        },
    },
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
}


def test_auto_is_resolved_from_the_experiment_as_the_hf_integration_does(tmp_path):
    result = preflight(_experiment(tmp_path, HF_STYLE), world_size=2)
    assert result.problems == []
    ds = result.ds
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (1, 1)
    assert ds["train_batch_size"] == 2  # micro × accumulation × world size
    assert ds["gradient_clipping"] == 1.0  # the HF Trainer's max_grad_norm default
    params = ds["scheduler"]["params"]
    assert params["total_num_steps"] == 100  # train.max_steps
    assert (params["warmup_min_lr"], params["warmup_max_lr"]) == (0.0, 1e-3)  # optimizer lr
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # model.d_model²
    # accumulation follows a given train_batch_size
    result = preflight(_experiment(tmp_path, {**HF_STYLE, "train_batch_size": 8}), world_size=2)
    assert result.problems == [] and result.ds["gradient_accumulation_steps"] == 4


def test_auto_nothing_determines_is_refused_with_key_and_fix(tmp_path, capsys):
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    code, out = _check(capsys, _experiment(tmp_path, ds))
    assert code == 2
    assert 'optimizer.params.lr: "auto" cannot be resolved from the experiment' in out
    assert "set the learning rate, e.g. 1e-3" in out
    assert "can't multiply" not in out


def test_precision_auto_is_reported_once_never_as_enabled(tmp_path):
    """An unresolved "auto" under fp16/bf16 is its own problem; it must not also read as
    "enabled" (both-true, fp16 on a CPU), while the strings DeepSpeed reads as true still do."""
    ds = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
    problems = preflight(_experiment(tmp_path, ds), world_size=1).problems
    assert len(problems) == 2 and all('"auto" cannot be resolved' in p for p in problems)
    ds = {"fp16": {"enabled": "True"}, "bf16": {"enabled": "yes"}}
    problems = preflight(_experiment(tmp_path, ds), world_size=1).problems
    assert any("both true" in p for p in problems)
    assert any("fp16.enabled: true for ranks without a GPU" in p for p in problems)


def test_micro_batch_other_than_one_is_refused_with_its_meaning(tmp_path, capsys):
    ds = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32}
    path = _experiment(tmp_path, ds)
    data = json.loads((tmp_path / "ds.json").read_text())
    del data["gradient_accumulation_steps"]
    (tmp_path / "ds.json").write_text(json.dumps(data))
    code, out = _check(capsys, path, "--world-size", "2")
    assert code == 2
    text = " ".join(out.split())
    assert "train_micro_batch_size_per_gpu: 32 is not an utterance count in omni-ds" in text
    assert "loader batch of up to data.max_batch_seconds (40 s of audio)" in text
    assert "DeepSpeed would accumulate 256 / (32 × 2) = 4 loader batches per step" in text
    assert "set gradient_accumulation_steps: 4" in text


def test_a_micro_batch_derived_from_train_batch_size_and_accumulation_is_refused(tmp_path, capsys):
    # DeepSpeed derives micro = 32 / (2 × 8) = 2 from these two keys: the same state as an
    # explicit micro batch of 2, and the same misreading of train_batch_size as utterances.
    path = _experiment(tmp_path, {"train_batch_size": 32, "gradient_accumulation_steps": 2})
    data = json.loads((tmp_path / "ds.json").read_text())
    data.pop("train_micro_batch_size_per_gpu", None)
    (tmp_path / "ds.json").write_text(json.dumps(data))
    code, out = _check(capsys, path, "--world-size", "8")
    text = " ".join(out.split())
    assert code == 2, out
    assert "makes DeepSpeed's micro batch 32 / (2 × 8) = 2, which is not an utterance count" in text
    assert "set train_batch_size: 16 (or remove it)" in text
    data["train_batch_size"] = 16  # micro 1: what omni-ds trains, accepted as it is
    (tmp_path / "ds.json").write_text(json.dumps(data))
    code, out = _check(capsys, path, "--world-size", "8")
    assert code == 0, out


def test_train_batch_size_counting_loader_batches_is_spelled_out(tmp_path, capsys):
    _experiment(tmp_path, {"train_batch_size": 8})
    data = json.loads((tmp_path / "ds.json").read_text())
    del data["gradient_accumulation_steps"]
    (tmp_path / "ds.json").write_text(json.dumps(data))
    code, out = _check(capsys, tmp_path / "exp.yaml", "--world-size", "2")
    assert code == 0, out
    text = " ".join(out.split())
    assert (
        "warning: deepspeed: train_batch_size: 8 counts loader batches, not utterances: at "
        "world size 2 each optimizer step accumulates 8 / 2 = 4 loader batches" in text
    )


@pytest.mark.parametrize("section", ["activation_checkpointing", "data_efficiency"])
def test_sections_that_would_do_nothing_are_refused(tmp_path, capsys, section):
    value = {"partition_activations": True} if section == "activation_checkpointing" else {
        "enabled": True, "data_sampling": {"enabled": True}}  # fmt: skip
    code, out = _check(capsys, _experiment(tmp_path, {section: value}))
    assert code == 2
    assert f"deepspeed: {section}: this section " in out and "remove it" in out
    if section == "data_efficiency":
        code, out = _check(capsys, _experiment(tmp_path, {section: {"enabled": False}}))
        assert code == 0, out


def test_check_config_refuses_what_train_would(tmp_path, capsys):
    """Each of these passed check-config and failed only once train had started ranks."""
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": -0.005, "torch_adam": True}}}
    code, out = _check(capsys, _experiment(tmp_path, ds))
    assert code == 2
    assert "optimizer.params.lr: -0.005 is negative; PyTorch refuses it" in out
    # fp16 for ranks without a GPU (this host has none; --device names the job's)
    fp16 = json.loads((REPO / "ds_configs" / "zero2_fp16.json").read_text())
    path = _experiment(tmp_path, fp16, whole=True)
    code, out = _check(capsys, path)
    assert code == 2 and "fp16.enabled: true for ranks without a GPU" in out
    assert _check(capsys, path, "--device", "cuda")[0] == 0
    # the expert-parallel size is named by its full key
    code, out = _check(capsys, _experiment(tmp_path), "--world-size", "3", "--set",
                       "model.moe.ep_size=2")  # fmt: skip
    assert code == 2 and "model.moe.ep_size: 2 does not divide the world size (3)" in out


def test_monitor_sections_stay_as_deepspeed_documents_them(tmp_path):
    """W&B and Comet get no output_path/job_name (DeepSpeed's models reject them); the file
    monitors' relative paths go into the run dir."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = json.loads((REPO / "ds_configs" / "zero1_fp32.json").read_text())
    ds.update(
        wandb={"enabled": True, "project": "asr", "group": "omni", "team": "lab"},
        comet={"enabled": True, "project": "asr", "online": False},
        csv_monitor={"enabled": True},
    )
    run = ds_config_for_run(ds, tmp_path / "run")
    assert run["wandb"] == ds["wandb"] and run["comet"] == ds["comet"]
    assert run["csv_monitor"]["output_path"] == str(tmp_path / "run" / "csv_monitor")
    assert run["tensorboard"]["output_path"] == str(tmp_path / "run" / "tensorboard")
    config = DeepSpeedConfig(run)  # raised "Extra inputs are not permitted" before
    assert config.monitor_config.wandb.project == "asr"


def test_a_monitor_without_its_package_is_refused(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("comet_ml") is not None:
        pytest.skip("comet_ml is installed here")
    code, out = _check(capsys, _experiment(tmp_path, {"comet": {"enabled": True}}))
    assert code == 2
    assert "comet.enabled: true but the comet_ml package is not installed; pip install " in out
