"""Resharding real DeepSpeed ZeRO-2 + expert-parallel checkpoints of the encoder across layouts.

One chain of runs, each resuming the previous one's checkpoint on another layout through
``Checkpointer.load`` (which reshards transparently), on a global batch that is the same for every
world size (each rank takes its share of 4 utterances; dropless routing, no balance loss, no
dropout or SpecAugment), so every resumed run must reproduce the straight run:

    straight 2 ranks ep2 ──@2──▶ 1 rank ──@4──▶ 2 ranks ep2 ──@6──▶ 2 ranks ep1
        ──@8──▶ 2 ranks ep2 ──@10──▶ 4 ranks ep4 ──@12──▶ 2 ranks ep2 (steps 13-14)

(ZeRO stage 2, with stage 1 on the 1-rank, 2-rank ep1 and 4-rank hops.)

After each load every parameter's fp32 master and Adam moments, as DeepSpeed itself reports them
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, experts mapped to global ids),
must equal what the saving run reported, tensor by tensor; losses must follow the straight run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from harness import run_command, run_function

from omni_ds.config.loading import from_dict
from omni_ds.errors import CheckpointError

VOCAB = 12
SAMPLES = 8000  # 0.5 s
GLOBAL_BATCH = 4
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
# Resumed losses vs the straight run: float reductions run in another order on another layout.
LOSS_RTOL = 1e-4


def experiment(ep_size: int):
    from omni_ds.config.experiment import ExperimentConfig

    model = {
        "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
        "dropout": 0.0, "position": "sinusoidal",
        "frontend": {"n_mels": 16, "specaug": {"freq_masks": 0, "time_masks": 0}},
        "moe": {"router": "omni", "num_experts": 4, "ep_size": ep_size, "dropless": True,
                "balance_loss_weight": 0.0},
    }  # fmt: skip
    return from_dict(ExperimentConfig, {"model": model})


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 3e-3}},
    "zero_optimization": {"stage": 2},
}


def rank_batch(step: int, rank: int, world_size: int):
    """Rank ``rank``'s share of global batch ``step`` (the same 4 utterances for any layout)."""
    g = torch.Generator().manual_seed(step)
    audio = torch.randn(GLOBAL_BATCH, SAMPLES, generator=g) * 0.1
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, 5), generator=g)
    share = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    n = share.stop - share.start
    return audio[share], torch.full((n,), SAMPLES), tokens[share], torch.full((n,), 5)


def full_state(engine, rank: int, ep_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 master and Adam moments as DeepSpeed reports them (collective),
    local expert ids mapped to global ones."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # ZeRO-1/2 links parameters to their Adam state after the first group's first step only,
    # before later groups (the experts) have state; link again so that all are reported.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    model = engine.module
    per_rank = 4 // ep_size
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r"(.*deepspeed_experts\.)(\d+)(\..*)", name)
        if m:
            name = f"{m[1]}{(rank % ep_size) * per_rank + int(m[2])}{m[3]}"
        out[name] = {
            "fp32": safe_get_full_fp32_param(p).clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        }
    return out


def train_hop(run_dir: str, ep_size: int, resume: str | None, stop: int, save_at: int,
              stage: int = 2) -> dict:  # fmt: skip
    """Rank worker: build the encoder, resume ``resume`` (any layout), train to ``stop``, saving
    at ``save_at``; returns the mean loss per step, the state after loading and at the save."""
    import torch.distributed as tdist

    from omni_ds import dist
    from omni_ds.ckpt.saver import Checkpointer
    from omni_ds.config.train import CheckpointConfig
    from omni_ds.model.encoder import build_model
    from omni_ds.train.engine import build_engine

    with dist.distributed() as info:
        rank, world = info.env.rank, info.env.world_size
        torch.manual_seed(0)
        model = build_model(experiment(ep_size).model)
        engine = build_engine(model, {**DS_CONFIG, "zero_optimization": {"stage": stage}})
        ckpt = Checkpointer(engine, Path(run_dir), CheckpointConfig(keep_last=100), ep_size=ep_size)
        start, loaded, saved, logits = 0, None, None, None
        if resume is not None:
            client, _ = ckpt.load(Path(resume))
            ckpt.restore_rng(client)
            start = client["step"]
            loaded = full_state(engine, rank, ep_size)
        losses = {}
        for step in range(start, stop):
            audio, lens, tokens, token_lens = rank_batch(step, rank, world)
            loss = model.loss(engine(audio, lens), tokens, token_lens).total
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            tdist.all_reduce(mean)
            losses[step + 1] = mean.item() / world
            if step + 1 == save_at:
                ckpt.save(step + 1, {}, {"counters": {"step": step + 1, "samples": 2 * rank}})
                saved = full_state(engine, rank, ep_size)
                engine.eval()
                with torch.no_grad():
                    logits = engine(*rank_batch(99, 0, 1)[:2]).logits
                engine.train()
        return {"losses": losses, "loaded": loaded, "saved": saved, "logits": logits}


def merged(states: list[dict]) -> dict:
    out = {}
    for state in states:
        for name, values in state.items():
            out.setdefault(name, values)
    return out


def assert_same_state(loaded: dict, saved: dict) -> None:
    assert loaded.keys() == saved.keys()
    assert sum("deepspeed_experts" in k for k in saved) == 2 * 4 * 4  # layers x experts x tensors
    for name in saved:
        for key in STATE_KEYS:
            assert torch.equal(loaded[name][key], saved[name][key]), (name, key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """2 ranks ep_size=2 for 14 steps, checkpoint at step 2."""
    run = tmp_path_factory.mktemp("straight")
    results = run_function(train_hop, 2, args=(str(run), 2, None, 14, 2), timeout=300)
    return {"run": run, "losses": results[0]["losses"], "saved": merged(r["saved"] for r in results),
            "logits": results[0]["logits"]}  # fmt: skip


@pytest.mark.distributed
def test_checkpoint_layout_is_read_like_deepspeed_reports_it(straight):
    from omni_ds.ckpt.zero import ZeroCheckpoint

    ckpt = ZeroCheckpoint(straight["run"] / "checkpoints" / "step_2")
    assert (ckpt.world_size, ckpt.ep_size, ckpt.experts_per_rank) == (2, 2, 2)
    saved = straight["saved"]
    assert sorted(ckpt.names()) == sorted(saved)
    for name in saved:
        values = ckpt.read(name)
        for key in STATE_KEYS:
            assert torch.equal(values[key], saved[name][key]), (name, key)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_chain_across_world_sizes_and_ep_sizes(straight, tmp_path):
    source, state = straight["run"] / "checkpoints" / "step_2", straight["saved"]
    # (ranks, ep_size, ZeRO stage): stage 1 and 2 share the shard layout, and alternate here
    hops = [(1, 1, 1), (2, 2, 2), (2, 1, 1), (2, 2, 2), (4, 4, 1), (2, 2, 2)]
    for i, (ranks, ep, stage) in enumerate(hops):
        start = 2 * (i + 1)
        run = tmp_path / f"hop{i}"
        results = run_function(train_hop, ranks, args=(str(run), ep, str(source), start + 2,
                                                       start + 2, stage), timeout=300)  # fmt: skip
        sibling = source.parent / f"{source.name}.reshard-w{ranks}-ep{ep}"
        assert (sibling / "omni_ds_manifest.json").is_file(), f"hop {i}: no reshard happened"
        assert_same_state(merged(r["loaded"] for r in results), state)
        for step, loss in results[0]["losses"].items():
            assert loss == pytest.approx(straight["losses"][step], rel=LOSS_RTOL), (i, step)
        source, state = (
            run / "checkpoints" / f"step_{start + 2}",
            merged(r["saved"] for r in results),
        )


@pytest.mark.distributed
def test_reshard_cli_and_consolidate_give_the_live_model(straight, tmp_path):
    from safetensors.torch import load_file

    from omni_ds.ckpt.zero import ZeroCheckpoint
    from omni_ds.cli import main
    from omni_ds.model.encoder import build_model

    source = straight["run"] / "checkpoints" / "step_2"
    out = tmp_path / "w1" / "checkpoints" / "step_2"
    assert main(["ckpt", "reshard", str(source), "--world-size", "1", "--ep-size", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    resharded = ZeroCheckpoint(out)
    assert (resharded.world_size, resharded.ep_size) == (1, 1)
    for name, values in straight["saved"].items():
        assert all(torch.equal(resharded.read(name)[k], values[k]) for k in STATE_KEYS), name

    weights = tmp_path / "model.safetensors"
    assert main(["ckpt", "consolidate", str(out), "--out", str(weights)]) == 0
    tensors = load_file(str(weights))
    assert not any(".gate.wg." in k for k in tensors)  # the shared router once, as router.*
    model = build_model(experiment(ep_size=1).model)
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert all(".gate.wg." in k for k in result.missing_keys)  # tied to router.wg.weight
    model.eval()
    with torch.no_grad():
        logits = model(*rank_batch(99, 0, 1)[:2]).logits
    torch.testing.assert_close(logits, straight["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_inspect_reports_the_layout(straight, capsys):
    from omni_ds.cli import main

    assert main(["ckpt", "inspect", str(straight["run"])]) == 0
    text = capsys.readouterr().out
    assert "world size 2, ep_size 2" in text and "step 2" in text
    assert "experts: 2 MoE layers x 4" in text


@pytest.mark.distributed
@pytest.mark.parametrize(
    "damage, named",
    [
        ("delete zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("delete layer_1_expert_3_mp_rank_00_model_states.pt", "layer_1_expert_3_mp_rank_00_model_states.pt"),
        ("truncate zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("truncate layer_0_expert_2_mp_rank_00_model_states.pt", "layer_0_expert_2_mp_rank_00_model_states.pt"),
        ("truncate mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"),
    ],
)  # fmt: skip
def test_damaged_checkpoint_names_the_bad_file(straight, tmp_path, damage, named):
    from omni_ds.ckpt.reshard import reshard

    tag = tmp_path / "step_2"
    shutil.copytree(straight["run"] / "checkpoints" / "step_2", tag)
    action, name = damage.split()
    if action == "delete":
        (tag / name).unlink()
    else:
        data = (tag / name).read_bytes()
        (tag / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(named)):
        reshard(tag, tmp_path / "out", world_size=1, ep_size=1)


@pytest.mark.distributed
def test_impossible_layouts_are_refused(straight, tmp_path):
    from omni_ds.ckpt.reshard import reshard

    source = straight["run"] / "checkpoints" / "step_2"
    with pytest.raises(CheckpointError, match="ep_size 3 must divide the world size 2"):
        reshard(source, tmp_path / "a", world_size=2, ep_size=3)
    with pytest.raises(CheckpointError, match="must divide the number of experts"):
        reshard(source, tmp_path / "b", world_size=8, ep_size=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.synth import generate

    out = tmp_path_factory.mktemp("corpus")
    generate(out, train_utterances=120, shard_size=60, vocab_size=64, workers=1, progress=False)
    return out


def train_argv(corpus: Path, ds: Path, run_dir: Path, *sets: str) -> list[str]:
    options = [
        f"train.run_dir={run_dir}", f"data.train=[{corpus}/train]", "data.dev={}",
        f"data.tokenizer={corpus}/tokenizer.model", "data.max_batch_seconds=30",
        "data.num_workers=0", f"deepspeed={ds}", "train.log_every=1",
        "train.progress_bar=false", "train.max_steps=12", "checkpoint.every_steps=6", *sets,
    ]  # fmt: skip
    return ["omni-ds", "train", "configs/tiny.yaml", *[a for o in options for a in ("--set", o)]]


@pytest.mark.distributed
@pytest.mark.slow
def test_omni_ds_train_resume_auto_on_one_rank_continues_the_curve(corpus, tmp_path):
    """``omni-ds train`` (bf16 ZeRO-2) on 2 ranks ep_size 2 for 12 steps; the same run resumed
    from step 6 on 1 rank (ep_size 1) reshards by itself and continues: the same learning rates,
    and a loss curve that carries on from where it was (one rank sees half the data per step, so
    the batches differ): mean loss of steps 9-12 within 25% of the straight run's, and below
    half of the first step's, which a restart from scratch would not reach."""
    from omni_ds.ckpt.format import read_manifest
    from omni_ds.train.metrics import read_metrics

    ds = json.loads(Path("ds_configs/zero2_bf16.json").read_text())
    ds["scheduler"]["params"].update(warmup_num_steps=2, warmup_max_lr=3e-3)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_command(train_argv(corpus, tmp_path / "ds.json", straight, "model.moe.ep_size=2"), 2)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_12")
    (resumed / "checkpoints" / "latest").write_text("step_6")

    argv = train_argv(corpus, tmp_path / "ds.json", resumed, "model.moe.ep_size=1")
    (result,) = run_command([*argv, "--resume", "auto"], 1)
    assert "resharded" in result.stderr and "for 1 ranks, ep_size 1" in result.stderr
    before = {r["step"]: r for r in read_metrics(straight)}
    after = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(after) == list(range(1, 13))
    assert all(after[s]["loss"] == before[s]["loss"] for s in range(1, 7))  # the 2-rank part
    assert all(after[s]["lr"] == before[s]["lr"] for s in range(1, 13))
    tail_before = sum(before[s]["loss"] for s in range(9, 13)) / 4
    tail_after = sum(after[s]["loss"] for s in range(9, 13)) / 4
    print(f"steps 9-12 mean loss: straight {tail_before:.3f}, resumed on 1 rank {tail_after:.3f}"
          f" (step 1: {before[1]['loss']:.3f})")  # fmt: skip
    assert tail_after == pytest.approx(tail_before, rel=0.25)
    assert tail_after < 0.5 * before[1]["loss"]
    manifest = read_manifest(resumed / "checkpoints" / "step_12")
    assert (manifest["world_size"], manifest["ep_size"]) == (1, 1)


@pytest.mark.distributed
@pytest.mark.slow
def test_omni_ds_train_resume_that_cannot_reshard_exits_2_in_one_line(corpus, tmp_path):
    """A 2-rank run's checkpoint whose rank-1 ZeRO shard was damaged before its manifest was
    written (so the tag verifies, sizes and checksums included): resuming
    it on 1 rank must reshard it, which finds the damage; ``omni-ds train`` says so in one line
    naming the file, with no traceback, and exits 2."""
    from omni_ds.ckpt.format import MANIFEST, latest_checkpoint, verify, write_manifest

    run = tmp_path / "run"
    ds = Path("ds_configs/zero1_fp32.json")
    steps = ("train.max_steps=2", "checkpoint.every_steps=2")
    run_command(train_argv(corpus, ds, run, "model.moe.ep_size=2", *steps), 2)
    tag = run / "checkpoints" / "step_2"
    (shard,) = tag.glob("*zero_pp_rank_1_*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    write_manifest(tag, step=2, world_size=2, ep_size=2)
    assert latest_checkpoint(run / "checkpoints") == tag and verify(tag) == []

    argv = train_argv(corpus, ds, run, "model.moe.ep_size=1", "train.max_steps=4")
    (result,) = run_command([*argv, "--resume", "auto"], 1, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if shard.name in x]
    assert line.startswith(f"cannot resume: {shard} is damaged and cannot be read"), line
    assert not (tag.parent / "step_2.reshard-w1-ep1" / MANIFEST).exists()


def test_client_state_is_dealt_to_the_new_ranks():
    from omni_ds.ckpt.reshard import reshard_client_state
    from omni_ds.ckpt.saver import rng_state, set_rng_state

    def data(rank):
        return {"counters": {"step": 6, "tallies": {"samples": 10 + rank, "audio_seconds": 1.5}},
                "loader": {"epoch": 1, "tallies": {"skipped": {"too_long": rank + 1}, "read": 20}}}  # fmt: skip

    old = {"omni_ds": {"step": 6, "world_size": 2, "ep_size": 2, "rng": [rng_state()] * 2,
                       "data": [data(0), data(1)]}, "other": 1}  # fmt: skip
    new = reshard_client_state(old, 3, 1, step=6)["omni_ds"]
    assert (new["world_size"], new["ep_size"], len(new["rng"]), len(new["data"])) == (3, 1, 3, 3)
    assert new["rng"][:2] == old["omni_ds"]["rng"]
    set_rng_state(new["rng"][2])  # a valid state for the new rank
    assert new["data"][0] == {"counters": {"step": 6, "tallies": {"samples": 21, "audio_seconds": 3.0}},
                              "loader": {"epoch": 1, "tallies": {"skipped": {"too_long": 3}, "read": 40}}}  # fmt: skip
    assert new["data"][2] == {"counters": {"step": 6, "tallies": {"samples": 0, "audio_seconds": 0.0}},
                              "loader": {"epoch": 1, "tallies": {"skipped": {}, "read": 0}}}  # fmt: skip


def test_expert_groups_are_split_like_deepspeed_splits_them():
    """Above ``max_group_size`` values DeepSpeed cuts the expert group in several (a 600M model
    with ep_size 1 has several); the plan must cut at the same parameters."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from omni_ds.ckpt.zero import plan_groups

    numels = [50, 7, 30, 30, 12, 60, 1, 45]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in numels]
    for p in params:
        p.allreduce, p.group_name = False, "ep_size_2"
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"name": "dense", "params": params}, max_group_size=80
    )
    ds_sizes = [[p.numel() for p in g["params"]] for g in groups if g.get("moe")]
    experts = [(f"e.deepspeed_experts.{i}.w", n) for i, n in enumerate(numels)]
    plan = plan_groups([], experts, world_size=4, ep_size=2, alignment=1, max_group_size=80)
    assert [g.numels for g in plan] == ds_sizes == [[50, 7], [30, 30, 12], [60, 1], [45]]
    assert all(g.moe and g.dp_size == 2 for g in plan)
