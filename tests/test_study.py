"""The router study's settings and its LR rule (the trainings themselves run in `omni-ds study`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_ds.demo.study import (
    RunSpec,
    StudySettings,
    choose_lrs,
    comparison_specs,
    load_settings,
    run_dir,
    train_argv,
    write_ds_config,
)
from omni_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_settings_load_and_name_every_run():
    s = load_settings(REPO / "configs" / "study.yaml")
    assert s.depths == [4, 8] and s.seeds == [0, 1, 2] and s.routers == ["dense", "switch", "omni"]
    argv = train_argv(s, RunSpec("omni", 8, s.sweep_lrs[0], 1))
    assert "model.n_layers=8" in argv and "train.seed=1" in argv and "model.moe.ep_size=1" in argv
    assert f"train.max_steps={s.steps}" in argv and "train.dev_max_batches=0" in argv


def test_bad_settings_fail_naming_the_key(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("sweep_lr: [1.0e-3]\n")
    with pytest.raises(ConfigError, match="did you mean 'sweep_lrs'"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="sweep_seed: 5 is not in seeds"):
        StudySettings(sweep_seed=5)


def test_each_family_gets_the_lr_with_the_lowest_final_dev_wer(tmp_path):
    s = StudySettings(out=tmp_path, depths=[4], routers=["dense", "omni"], sweep_lrs=[1e-3, 1e-2],
                      steps=20, warmup_steps=2)  # fmt: skip
    final = {("dense", 1e-3): (0.50, 1.0), ("dense", 1e-2): (0.90, 0.5),
             ("omni", 1e-3): (0.40, 0.9), ("omni", 1e-2): (0.40, 0.7)}  # fmt: skip
    for (router, lr), (wer, loss) in final.items():
        run = run_dir(s, RunSpec(router, 4, lr, 0))
        run.mkdir(parents=True)
        rows = [{"kind": "dev/dev", "step": 10, "wer": 0.1, "loss": 0.1},  # not the final one
                {"kind": "dev/dev", "step": 20, "wer": wer, "loss": loss}]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = choose_lrs(s)
    assert chosen["L4-dense"]["lr"] == 1e-3  # lower WER wins although its loss is higher
    assert chosen["L4-omni"]["lr"] == 1e-2  # a tie in WER: the lower dev loss
    runs = comparison_specs(s, chosen)
    assert [r.name for r in runs][:3] == ["L4-dense-lr0.001-s0", "L4-dense-lr0.001-s1",
                                         "L4-dense-lr0.001-s2"]  # fmt: skip
    ds = json.loads(write_ds_config(s, 1e-2).read_text())
    assert ds["optimizer"]["params"]["lr"] == 1e-2
    assert ds["scheduler"]["params"]["total_num_steps"] == 20
