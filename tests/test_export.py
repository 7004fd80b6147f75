"""Export: a 2-rank ZeRO-2 ep_size=2 checkpoint of the real encoder → MODEL_DIR → same decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import run_function

from omni_ds.ckpt.consolidate import consolidate
from omni_ds.ckpt.format import resolve_tag_dir
from omni_ds.config.loading import from_dict
from omni_ds.errors import CheckpointError

VOCAB = 12
AUDIO_S = 16000  # 1 s -> 25 frames of 40 ms


def tiny_experiment(ep_size: int, router: str = "omni"):
    from omni_ds.config.experiment import ExperimentConfig

    model = {
        "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
        "dropout": 0.0, "frontend": {"n_mels": 16},
        "moe": {"router": router, "num_experts": 4, "ep_size": ep_size, "min_capacity": 1},
    }  # fmt: skip
    return from_dict(ExperimentConfig, {"model": model})


def eval_batch():
    g = torch.Generator().manual_seed(7)
    audio = torch.randn(3, AUDIO_S, generator=g) * 0.1
    lens = torch.tensor([AUDIO_S, AUDIO_S * 3 // 4, AUDIO_S // 2])
    audio[1, lens[1] :] = 0
    audio[2, lens[2] :] = 0
    return audio, lens


def train_save_decode(ckpt_dir: str, bf16: bool) -> dict:
    """Rank worker: 3 ZeRO-2 steps with ep_size=2, save, then decode the eval batch live."""
    from deepspeed.utils import safe_get_full_fp32_param

    from omni_ds import dist
    from omni_ds.model.decode import ctc_greedy
    from omni_ds.model.encoder import build_model
    from omni_ds.train.engine import build_engine

    with dist.distributed() as info:
        torch.manual_seed(0)
        model = build_model(tiny_experiment(ep_size=2).model)
        ds = {
            "train_micro_batch_size_per_gpu": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 2},
            "bf16": {"enabled": bf16},
        }
        engine = build_engine(model, ds)
        dtype = torch.bfloat16 if bf16 else torch.float32
        g = torch.Generator().manual_seed(100 + info.env.rank)
        for _ in range(3):
            audio = (torch.randn(2, AUDIO_S, generator=g) * 0.1).to(dtype)
            lens = torch.tensor([AUDIO_S, AUDIO_S // 2])
            tokens = torch.randint(0, VOCAB, (2, 5), generator=g)
            out = engine(audio, lens)
            loss = model.loss(out, tokens, torch.tensor([5, 3])).total
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(ckpt_dir, tag="step_3")
        engine.eval()
        audio, lens = eval_batch()
        with torch.no_grad():
            out = engine(audio.to(dtype), lens)
        masters = {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
        return {
            "hyps": ctc_greedy(out.logits.float(), out.out_lens),
            "logits": out.logits.float(),
            "masters": masters,
        }


def sentencepiece_model(path: Path) -> Path:
    import sentencepiece as spm

    text = ["abc def ghi", "cab bad fed", "hig fig dig"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(path / "sp"),
        vocab_size=VOCAB,
        model_type="char",
        minloglevel=2,
    )
    return path / "sp.model"


def to_global(rank_masters: list[dict], experts_per_rank: int) -> dict:
    """Every rank's full fp32 parameters, local expert ids mapped to global ones."""
    import re

    out = {}
    for rank, masters in enumerate(rank_masters):
        for name, value in masters.items():
            m = re.match(r"(.*deepspeed_experts\.)(\d+)(\..*)", name)
            if m:
                name = f"{m[1]}{rank * experts_per_rank + int(m[2])}{m[3]}"
            out.setdefault(name, value)
    return out


@pytest.mark.distributed
def test_exported_model_decodes_like_the_live_model(tmp_path):
    from safetensors import safe_open

    from omni_ds.ckpt.export import export_checkpoint
    from omni_ds.ckpt.model_dir import load_model_dir, read_weights
    from omni_ds.model.decode import ctc_greedy

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    live = run_function(train_save_decode, 2, args=(str(run_dir / "checkpoints"), False))
    # the rank-0 live decode is the reference; both ranks saw the same eval batch
    assert live[0]["hyps"] == live[1]["hyps"]
    assert any(live[0]["hyps"])

    import yaml

    from omni_ds.config.loading import to_dict

    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(tiny_experiment(ep_size=2))))
    model_dir = export_checkpoint(
        run_dir, tmp_path / "model", tokenizer=sentencepiece_model(tmp_path)
    )
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    # config.json: the model only (architecture, tokenizer, sample rate, version), no run paths
    import omni_ds

    config = json.loads((model_dir / "config.json").read_text())
    assert sorted(config) == ["format", "model", "omni_ds_version", "sample_rate", "tokenizer"]
    assert config["omni_ds_version"] == omni_ds.__version__ and config["sample_rate"] == 16000
    assert config["model"] == to_dict(tiny_experiment(ep_size=1).model)
    assert (
        config["tokenizer"]["file"] == "tokenizer.model" and config["tokenizer"]["vocab_size"] > 0
    )
    assert str(run_dir) not in (model_dir / "config.json").read_text()

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys if "weight" in k)
    router_keys = [k for k in keys if "router" in k or "gate" in k]
    assert router_keys == ["router.wg.weight"]  # the shared router is stored once
    tied = json.loads(meta["tied"])
    assert sorted(tied) == [f"blocks.{i}.ffn.moe.deepspeed_moe.gate.wg.weight" for i in range(2)]
    assert set(tied.values()) == {"router.wg.weight"}
    assert meta["fp32_masters"] == "true" and meta["global_steps"] == "3"
    assert meta["seed"] == str(tiny_experiment(ep_size=2).train.seed) and len(meta["recipe"]) == 16
    # all 2 layers x 4 experts are there under global ids
    assert {k.split("deepspeed_experts.")[1].split(".")[0] for k in keys if "experts" in k} == set(
        "0123"
    )

    # the CLI writes the same directory
    from omni_ds.cli import main

    tokenizer = model_dir / "tokenizer.model"
    cli_args = ["export", str(run_dir / "checkpoints"), "--out", str(tmp_path / "cli")]
    assert main([*cli_args, "--tokenizer", str(tokenizer)]) == 0
    for name in ("config.json", "tokenizer.model"):
        assert (tmp_path / "cli" / name).read_bytes() == (model_dir / name).read_bytes()
    cli_tensors, cli_meta = read_weights(tmp_path / "cli")
    api_tensors, api_meta = read_weights(model_dir)
    assert cli_meta == api_meta and cli_tensors.keys() == api_tensors.keys()
    assert all(torch.equal(cli_tensors[k], api_tensors[k]) for k in api_tensors)

    loaded = load_model_dir(model_dir)
    assert loaded.model.cfg.moe.ep_size == 1
    audio, lens = eval_batch()
    with torch.no_grad():
        out = loaded.model(audio, lens)
    assert ctc_greedy(out.logits, out.out_lens) == live[0]["hyps"]
    torch.testing.assert_close(out.logits, live[0]["logits"], rtol=1e-4, atol=1e-5)
    # the weights are exactly DeepSpeed's fp32 values
    masters = to_global([r["masters"] for r in live], experts_per_rank=2)
    state = loaded.model.state_dict()
    for name, value in masters.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)


@pytest.mark.distributed
def test_bf16_checkpoint_consolidates_to_the_fp32_masters(tmp_path):
    live = run_function(train_save_decode, 2, args=(str(tmp_path), True))
    merged = consolidate(tmp_path)
    assert merged.fp32_masters
    masters = to_global([r["masters"] for r in live], experts_per_rank=2)
    main = torch.load(tmp_path / "step_3" / "mp_rank_00_model_states.pt", weights_only=False)
    assert main["module"]["router.wg.weight"].dtype == torch.bfloat16
    for name, value in masters.items():
        assert merged.state_dict[name].dtype == torch.float32
        torch.testing.assert_close(merged.state_dict[name], value, rtol=0, atol=0)
    # the bf16 module copy is only a rounding of them
    bf16_router = main["module"]["router.wg.weight"].float()
    assert not torch.equal(bf16_router, merged.state_dict["router.wg.weight"])
    torch.testing.assert_close(
        bf16_router, merged.state_dict["router.wg.weight"], rtol=1e-2, atol=1e-2
    )


def test_resolve_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint tag"):
        resolve_tag_dir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match="step_9"):
        resolve_tag_dir(tmp_path)
