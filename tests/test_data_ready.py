"""check-config (and train, before any rank starts) checks the data: sources that name no shards
or no usable sample, a tokenizer that does not cover the transcripts or does not fit
model.vocab_size. Each refusal names the source, the cause and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sources import write_wds
from test_user_data import lowercase_tokenizer

from data_pipeline.tokenizer import Tokenizer
from omni_ds.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Unindexed webdataset.ShardWriter shards (6 samples, .txt labels) and a tokenizer."""
    root = tmp_path_factory.mktemp("wds")
    write_wds(root / "txt", 6, label="txt")
    write_wds(root / "key", 3, text_key="transcript")
    lowercase_tokenizer(root / "tok", [f"word {i}" for i in range(10)] * 3, vocab=20)
    lowercase_tokenizer(root / "other", ["a mat", "an ant", "man nan"] * 4, vocab=12)
    return root


def check(capsys, shards: Path, *sets: str, config: str = "configs/tiny.yaml", cmd="check-config"):
    options = [
        f"data.train=['{shards}/txt/shard-{{000000..000001}}.tar']",  # YAML: quote braces
        f"data.dev={{dev: {shards}/txt/shard-000000.tar}}",
        f"data.tokenizer={shards}/tok.model",
        f"deepspeed={REPO}/ds_configs/zero1_fp32.json",
        f"train.run_dir={shards}/run",
        *sets,
    ]
    code = main([cmd, str(REPO / config), *[a for o in options for a in ("--set", o)]])
    out, err = capsys.readouterr()
    return code, out + err


def test_unindexed_brace_named_shards_pass_and_get_indexed(shards, capsys):
    code, out = check(capsys, shards)
    assert code == 0, out
    assert "OK" in out


def test_each_broken_case_is_refused_naming_source_cause_and_fix(shards, capsys):
    wrong = f"{shards}/txt/shard-{{000000..000003}}.tar"
    code, out = check(capsys, shards, f"data.train=['{wrong}']")
    assert code == 2
    assert f"data.train[0]: {wrong}: 2 of the 4 shards it expands to do not exist" in out
    assert "check the pattern's range and folder" in out

    code, out = check(capsys, shards, f"data.train=[{shards}/key]")
    assert code == 2
    assert f"data.train[0]: {shards}/key: no usable sample (3 left out: {{'bad_label': 3}})" in out

    code, out = check(capsys, shards, f"data.train=[{shards}/key]", "data.text_key=transcript")
    assert code == 0, out

    code, out = check(capsys, shards, f"data.tokenizer={shards}/other.model")
    assert code == 2
    assert "6 of 6 sampled transcripts have <unk> in their targets" in out
    assert f"omni-ds train-tokenizer {shards}/txt/shard-{{000000..000001}}.tar" in out
    assert "data.dev.dev: " in out  # the dev set is checked too

    code, out = check(capsys, shards, f"data.dev={{dev: {shards}/nowhere}}")
    assert code == 2 and f"data.dev.dev: {shards}/nowhere: does not exist" in out


def test_demo_vocab_size_against_a_bigger_tokenizer(shards, capsys):
    """configs/demo.yaml has model.vocab_size 16; a tokenizer of more pieces used to pass the
    check and then fail in every rank."""
    pieces = Tokenizer(shards / "tok.model").vocab_size
    assert pieces > 16
    code, out = check(capsys, shards, config="configs/demo.yaml")
    assert code == 2
    assert f"model.vocab_size: 16 is smaller than the {pieces} pieces of the tokenizer" in out
    assert f"set model.vocab_size to {pieces}" in out


def test_train_refuses_the_same_before_starting(shards, capsys):
    code, out = check(capsys, shards, f"data.tokenizer={shards}/other.model", cmd="train")
    assert code == 2 and "<unk> in their targets" in out
    assert not (shards / "run").exists()
