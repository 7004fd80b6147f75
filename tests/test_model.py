"""omni_ds.model: preset sizes, padding invariance, overfitting per router mode, bf16, the loss."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from synth_speech import utterance

from omni_ds.config.experiment import load_config
from omni_ds.config.model import ModelConfig, MoEConfig
from omni_ds.errors import ConfigError
from omni_ds.model.decode import ctc_greedy
from omni_ds.model.encoder import SpeechEncoder, build_model
from omni_ds.model.router import Router

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROUTERS = ["dense", "switch", "omni"]


def tiny(*overrides: str) -> ModelConfig:
    return load_config(CONFIGS / "tiny.yaml", list(overrides)).model


def batch(token_lists: list[list[int]], seed: int = 0):
    waves = [utterance(t, seed=seed + i) for i, t in enumerate(token_lists)]
    audio = torch.zeros(len(waves), max(map(len, waves)))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = torch.from_numpy(w)
    tokens = torch.zeros(len(token_lists), max(map(len, token_lists)), dtype=torch.long)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = torch.tensor(t)
    return {
        "audio": audio,
        "audio_lens": torch.tensor([len(w) for w in waves]),
        "tokens": tokens,
        "token_lens": torch.tensor([len(t) for t in token_lists]),
    }


# (preset, total, active): the paper's sizes; the 8x84M totals follow from the 84M backbone
# (12 MoE layers x 7 extra experts of 4.72M each).
PRESETS = [
    ("dense_84m", 84e6, 84e6),
    ("switch_8x84m", 482e6, 84e6),
    ("omni_8x84m", 482e6, 84e6),
    ("omni_4x_600m", 613e6, 210e6),
]


@pytest.mark.parametrize(("preset", "total", "active"), PRESETS)
def test_preset_parameter_counts_match_the_paper(preset, total, active):
    cfg = load_config(CONFIGS / f"{preset}.yaml").model
    with torch.device("meta"):
        model = build_model(cfg)
    n_total, n_active = model.parameter_counts()
    assert n_total == pytest.approx(total, rel=0.02), n_total
    assert n_active == pytest.approx(active, rel=0.02), n_active
    if cfg.moe.router == "omni":
        # one router tensor, registered before the blocks: its canonical name is router.*
        names = [n for n, _ in model.named_parameters()]
        assert [n for n in names if "wg" in n] == ["router.wg.weight"]
        assert names.index("router.wg.weight") < names.index("blocks.0.ln_attn.weight")


def test_switch_has_a_router_per_layer_and_omni_shares_one():
    switch, omni = (build_model(tiny(f"model.moe.router={r}")) for r in ("switch", "omni"))
    routers = lambda m: {id(b.ffn.router) for b in m.blocks if b.is_moe}  # noqa: E731
    assert switch.router is None and len(routers(switch)) == 4
    assert isinstance(omni.router, Router) and routers(omni) == {id(omni.router)}
    assert switch.parameter_counts()[0] - omni.parameter_counts()[0] == 3 * 4 * 64


def test_moe_every_two_makes_every_second_block_sparse():
    model = build_model(tiny("model.moe_every=2"))
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]


@pytest.mark.parametrize(
    ("router", "subsampling"), [(r, "stack") for r in ROUTERS] + [("omni", "conv")]
)
def test_utterance_output_is_the_same_alone_and_padded_in_a_batch(router, subsampling):
    torch.manual_seed(0)
    cfg = tiny(
        f"model.moe.router={router}",
        f"model.frontend.subsampling={subsampling}",
        "model.moe.dropless=true",
        "model.vocab_size=13",
    )
    model = build_model(cfg).eval()
    data = batch([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12, 0]])
    with torch.no_grad():
        out = model(data["audio"], data["audio_lens"], return_stats=True)
        starts = np.cumsum([0, *out.out_lens.tolist()])
        for i in range(3):
            n = int(data["audio_lens"][i])
            alone = model(
                data["audio"][i : i + 1, :n], data["audio_lens"][i : i + 1], return_stats=True
            )
            t = int(alone.out_lens[0])
            assert t == int(out.out_lens[i]) and alone.logits.shape[1] == t
            torch.testing.assert_close(out.logits[i, :t], alone.logits[0], atol=1e-4, rtol=1e-4)
            for full, own in zip(out.routing or [], alone.routing or []):
                assert torch.equal(full.expert[starts[i] : starts[i + 1]], own.expert)
    assert len(out.routing) == (0 if router == "dense" else 4)
    assert all(s.expert.shape[0] == int(out.out_lens.sum()) for s in out.routing)


# The overfitting set: 8 sentences over a few letters, as ids of a 13-piece SentencePiece model
# (the synthetic audio has 13 distinct token sounds).
SENTENCES = [
    "a seat",
    "eat tea",
    "test a toe",
    "see tao",
    "oat at sea",
    "tease ten eels",
    "ten toes",
    "a neat nest",
]


@functools.cache
def tokenizer() -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=model,
        vocab_size=13,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def utterances() -> list[list[int]]:
    return [tokenizer().encode(s) for s in SENTENCES]


@pytest.mark.parametrize("router", ROUTERS)
def test_tiny_model_overfits_eight_utterances(router):
    """CTC loss near zero and greedy decoding gives back every sentence, within 200 steps."""
    torch.manual_seed(0)
    cfg = tiny(
        f"model.moe.router={router}",
        "model.vocab_size=13",
        "model.dropout=0.0",
        "model.frontend.specaug.freq_masks=0",
        "model.frontend.specaug.time_masks=0",
    )
    model = build_model(cfg)
    assert tokenizer().get_piece_size() == 13
    data = batch(utterances())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, 201):
        model.train()
        loss = model.loss(
            model(data["audio"], data["audio_lens"]), data["tokens"], data["token_lens"]
        )
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                out = model(data["audio"], data["audio_lens"])
                ctc = float(model.loss(out, data["tokens"], data["token_lens"]).ctc)
            ids = ctc_greedy(out.logits, out.out_lens)
            if ctc < 0.05 and ids == utterances():
                assert [tokenizer().decode(x) for x in ids] == SENTENCES
                return
    pytest.fail(f"{router}: not overfit after {step} steps (ctc {ctc:.3f})")


@pytest.mark.parametrize("router", ["dense", "omni"])
def test_bf16_forward_backward_keeps_ctc_in_fp32(router):
    torch.manual_seed(0)
    model = build_model(tiny(f"model.moe.router={router}", "model.vocab_size=13"))
    data = batch(utterances()[:3])
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 mode holds the module
    out = model(data["audio"], data["audio_lens"])
    assert out.logits.dtype == torch.bfloat16
    loss = model.loss(out, data["tokens"], data["token_lens"])
    assert loss.total.dtype == loss.ctc.dtype == torch.float32
    loss.total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and g.isfinite().all() for g in grads)
    model.float().zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision on fp32 weights
        out = model(data["audio"], data["audio_lens"])
        loss = model.loss(out, data["tokens"], data["token_lens"])
    assert out.logits.dtype == torch.bfloat16 and loss.ctc.dtype == torch.float32
    loss.total.backward()
    assert loss.total.isfinite() and model.head.weight.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp16_autocast_on_gpu():
    model = build_model(tiny("model.vocab_size=13")).cuda()
    data = {k: v.cuda() for k, v in batch(utterances()[:3]).items()}
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(data["audio"], data["audio_lens"])
        loss = model.loss(out, data["tokens"], data["token_lens"])
    assert out.logits.dtype == torch.float16 and loss.ctc.dtype == torch.float32
    loss.total.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_loss_is_ctc_per_target_token_plus_weighted_aux_losses():
    torch.manual_seed(0)
    model: SpeechEncoder = build_model(
        tiny(
            "model.vocab_size=13",
            "model.moe.balance_loss_weight=0.5",
            "model.moe.z_loss_weight=0.1",
        )
    )
    data = batch(utterances()[:4])
    out = model(data["audio"], data["audio_lens"])
    loss = model.loss(out, data["tokens"], data["token_lens"])
    per_utt = F.ctc_loss(
        out.logits.float().log_softmax(-1).transpose(0, 1),
        data["tokens"],
        out.out_lens,
        data["token_lens"],
        blank=13,
        reduction="none",
    )
    torch.testing.assert_close(loss.ctc, per_utt.sum() / data["token_lens"].sum())
    assert out.balance_loss.item() > 0 and out.z_loss.item() > 0
    torch.testing.assert_close(loss.total, loss.ctc + 0.5 * loss.balance + 0.1 * loss.z)


def test_config_errors_name_the_key_and_fix():
    with pytest.raises(ConfigError, match="model.n_heads"):
        ModelConfig(d_model=64, n_heads=5)
    with pytest.raises(ConfigError, match="model.moe_every: 3"):
        ModelConfig(moe_every=3)
    with pytest.raises(ConfigError, match="model.n_layers"):
        ModelConfig(n_layers=1, moe_every=2, moe=MoEConfig(router="switch"))
    with pytest.raises(ConfigError, match="model.frontend.subsampling"):
        tiny("model.frontend.subsampling=conv3")
