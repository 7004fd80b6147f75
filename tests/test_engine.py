"""The shipped DeepSpeed JSONs train a real MoE engine on CPU, and the gradient norm counts each
expert once under expert parallelism (DeepSpeed issue 8475)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import child_pythonpath, run_function

REPO = Path(__file__).resolve().parents[1]


def _model(ep_size: int, rank: int):
    """TinyMoE with ``ep_size`` whose weights equal one ep_size=1 model built from seed 0."""
    from tiny_moe import TinyMoE

    torch.manual_seed(0)
    reference = TinyMoE(ep_size=1).state_dict()
    model = TinyMoE(ep_size=ep_size)
    local = 4 // ep_size
    state = {}
    for key in model.state_dict():
        if ".deepspeed_experts." in key:
            prefix, rest = key.split(".deepspeed_experts.")
            index, tail = rest.split(".", 1)
            global_index = (rank % ep_size) * local + int(index)
            state[key] = reference[f"{prefix}.deepspeed_experts.{global_index}.{tail}"]
        else:
            state[key] = reference[key]
    model.load_state_dict(state)
    return model


def _ds(name: str, **changes) -> dict:
    ds = json.loads((REPO / "ds_configs" / name).read_text())
    ds["scheduler"]["params"].update(warmup_num_steps=1, warmup_max_lr=1e-2)
    ds["tensorboard"]["enabled"] = False  # omni-ds train points it into a run dir; no run here
    ds.update(changes)
    return ds


SHIPPED_ON_CPU = ("zero1_fp32.json", "zero2_bf16.json", "zero2_cpu_offload.json")


def train_configs(names: tuple[str, ...], steps: int) -> dict[str, tuple[float, float]]:
    """For each JSON: a fresh engine, eval loss on a held-out batch before and after training."""
    from tiny_moe import batch

    from omni_ds import dist
    from omni_ds.train.engine import build_engine

    info = dist.init_distributed()
    results = {}
    for name in names:
        engine = build_engine(_model(2, info.rank), _ds(name))
        dtype = next(engine.module.parameters()).dtype

        def eval_loss(engine=engine, dtype=dtype) -> float:
            engine.eval()
            with torch.no_grad():
                loss = engine(*batch(999, info.rank, dtype=dtype)).item()
            engine.train()
            return loss

        before = eval_loss()
        for step in range(steps):
            loss = engine(*batch(step % 4, info.rank, dtype=dtype))
            engine.backward(loss)
            engine.step()
        results[name] = (before, eval_loss())
    dist.shutdown()
    return results, _muon_compiled()


def _muon_compiled() -> bool:
    """Whether DeepSpeed's Muon kernels were wrapped by ``torch.compile`` (which imports
    Inductor), and so whether anything was compiled for an optimizer that is not Muon."""
    from deepspeed.runtime.zero.muon import original_muon

    return hasattr(original_muon.zeropower_via_newtonschulz5, "_torchdynamo_orig_callable")


@pytest.mark.distributed
def test_shipped_configs_train_an_expert_parallel_moe():
    """Each shipped JSON but fp16 (DeepSpeed's CPU accelerator refuses it; check-config
    validates it) trains a 2-rank ep_size=2 MoE: the held-out loss falls."""
    results = run_function(train_configs, nprocs=2, args=(SHIPPED_ON_CPU, 12), timeout=300)
    for per_rank, muon_compiled in results:
        assert not muon_compiled  # AdamW engines: DeepSpeed's Muon probe compiled nothing
        assert per_rank.keys() == set(SHIPPED_ON_CPU)
        for name, (before, after) in per_rank.items():
            assert after < 0.8 * before, (name, before, after)


def grad_norms(stages: tuple[int, ...]) -> dict[tuple[int, int], list[float]]:
    from tiny_moe import batch

    from omni_ds import dist
    from omni_ds.train.engine import build_engine
    from omni_ds.train.metrics import expert_parallel_grad_norm

    info = dist.init_distributed()
    norms = {}
    for stage, ep_size in ((s, e) for s in stages for e in (1, 2)):
        model = _model(ep_size, info.rank)
        model.drop.p = 0.0
        ds = _ds("zero1_fp32.json", gradient_clipping=0.0)
        ds["zero_optimization"]["stage"] = stage
        engine = build_engine(model, ds)
        norms[stage, ep_size] = []
        for step in range(3):
            loss = engine(*batch(step, info.rank))
            engine.backward(loss)
            if stage == 0:  # DeepSpeed reports no norm at stage 0
                norms[stage, ep_size].append(expert_parallel_grad_norm(engine.module))
            engine.step()
            if stage > 0:
                norms[stage, ep_size].append(float(engine.get_global_grad_norm()))
    dist.shutdown()
    return norms


@pytest.mark.distributed
def test_grad_norm_is_the_same_whether_experts_are_split_or_replicated():
    """2 ranks, experts replicated (ep_size 1) vs split across ranks (ep_size 2), same weights and
    data: the gradient norm must not depend on where the experts live. Stage 2: DeepSpeed's own
    norm; stage 0: omni-ds's (DeepSpeed reports none there)."""
    results = run_function(grad_norms, nprocs=2, args=((0, 2),), timeout=300)
    for norms in results:
        for stage in (0, 2):
            assert all(n > 0 for n in norms[stage, 1])
            assert norms[stage, 2] == pytest.approx(norms[stage, 1], rel=1e-5), stage
    assert results[0] == results[1]


def test_a_muon_json_keeps_deepspeeds_compiled_muon_kernels():
    code = (
        "import os\n"
        "from omni_ds.train.engine import _import_muon_uncompiled\n"
        "from test_engine import _muon_compiled\n"
        "_import_muon_uncompiled({'optimizer': {'type': 'Muon', 'params': {'lr': 0.02}}})\n"
        "print(_muon_compiled(), 'TORCHDYNAMO_DISABLE' in os.environ)\n"
    )
    env = {**os.environ, "PYTHONPATH": child_pythonpath(REPO, REPO / "tests")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout  # fmt: skip
    assert out.split()[-2:] == ["True", "False"]
