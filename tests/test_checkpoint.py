"""omni_ds.ckpt.saver: exact resume (RNG and data state included), atomicity, pruning, policy."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from harness import run_function

from omni_ds.ckpt.format import MANIFEST, complete_checkpoints, latest_checkpoint, tag_of
from omni_ds.config.train import CheckpointConfig

REPO = Path(__file__).resolve().parents[1]


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().numpy().tobytes())
    return h.hexdigest()


def run_steps(run_dir: str, ep_size: int, steps: int, resume: str | None) -> dict:
    """Train TinyMoE (dropout on) for ``steps``, saving every 2; optionally resume first."""
    from tiny_moe import TinyMoE, batch

    from omni_ds import dist
    from omni_ds.ckpt.saver import Checkpointer
    from omni_ds.train.engine import build_engine

    info = dist.init_distributed()
    dist.seed_everything(0, info.rank)
    ds = json.loads((REPO / "ds_configs" / "zero1_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = 2
    ds["tensorboard"]["enabled"] = False
    engine = build_engine(TinyMoE(ep_size=ep_size), ds)
    ckpt = Checkpointer(engine, Path(run_dir), CheckpointConfig(keep_last=2), ep_size=ep_size)
    start, data_state = 0, None
    if resume is not None:
        client, data_state = ckpt.load(ckpt.resume_path(resume))
        ckpt.restore_rng(client)
        start = client["step"]
    losses = {}
    for step in range(start, steps):
        loss = engine(*batch(step, info.rank))
        engine.backward(loss)
        engine.step()
        losses[step] = loss.item()
        if (step + 1) % 2 == 0:
            ckpt.save(step + 1, {"note": "test"}, data_state={"rank": info.rank, "at": step + 1})
    result = {"losses": losses, "digest": _digest(engine.module), "data_state": data_state}
    dist.shutdown()
    return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, list[dict]]:
    """6 steps on 2 ranks (ep_size 2), a checkpoint every 2: (run dir, each rank's result)."""
    run = tmp_path_factory.mktemp("straight")
    return run, run_function(run_steps, 2, args=(str(run), 2, 6, None), timeout=300)


@pytest.mark.distributed
def test_resume_is_bitwise_identical_and_keeps_the_last_k(straight, tmp_path):
    a, straight = straight
    kept = [p.name for p in complete_checkpoints(a / "checkpoints")]
    assert kept == ["step_4", "step_6"]  # keep_last=2
    assert (a / "checkpoints" / "latest").read_text() == "step_6"

    # Resume from step 4 in fresh processes: dropout masks (torch RNG) must be restored too.
    resume = str(a / "checkpoints" / "step_4")
    resumed = run_function(run_steps, 2, args=(str(tmp_path / "b"), 2, 6, resume), timeout=240)
    for rank in range(2):
        assert resumed[rank]["data_state"] == {"rank": rank, "at": 4}
        assert resumed[rank]["losses"] == {s: straight[rank]["losses"][s] for s in (4, 5)}
        assert resumed[rank]["digest"] == straight[rank]["digest"]


def load_on_one_rank(path: str) -> dict:
    from tiny_moe import TinyMoE

    from omni_ds import dist
    from omni_ds.ckpt.saver import Checkpointer
    from omni_ds.train.engine import build_engine

    dist.init_distributed()
    ds = json.loads((REPO / "ds_configs" / "zero1_fp32.json").read_text())
    ds["tensorboard"]["enabled"] = False
    engine = build_engine(TinyMoE(ep_size=1), ds)
    ckpt = Checkpointer(engine, Path(path).parents[1], CheckpointConfig(), ep_size=1)
    client, data_state = ckpt.load(Path(path))
    result = {"step": client["step"], "data": data_state, "global_steps": engine.global_steps}
    dist.shutdown()
    return result


@pytest.mark.distributed
def test_a_checkpoint_of_another_layout_is_resharded_then_loaded(straight):
    """2 ranks ep_size 2 -> 1 rank: resharded next to it (tests/test_reshard.py checks values)."""
    path = straight[0] / "checkpoints" / "step_6"
    (loaded,) = run_function(load_on_one_rank, 1, args=(str(path),), timeout=240)
    assert loaded == {"step": 6, "data": {"rank": 0, "at": 6}, "global_steps": 6}
    assert (path.parent / "step_6.reshard-w1-ep1" / MANIFEST).is_file()


def _fake_checkpoint(directory: Path, step: int, complete: bool) -> Path:
    path = directory / tag_of(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        manifest = {"step": step, "world_size": 1, "ep_size": 1, "files": {}}
        manifest["files"]["mp_rank_00_model_states.pt"] = 10
        (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_a_partial_checkpoint_is_never_picked(tmp_path):
    good = _fake_checkpoint(tmp_path, 2, complete=True)
    _fake_checkpoint(tmp_path, 4, complete=False)  # killed before its manifest
    (tmp_path / "latest").write_text("step_4")
    assert latest_checkpoint(tmp_path) == good
    # A manifest whose files were truncated afterwards does not count either.
    (good / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) is None


def test_resume_none_refuses_to_overwrite_a_run(tmp_path):
    from omni_ds.ckpt.saver import Checkpointer
    from omni_ds.errors import CheckpointError

    _fake_checkpoint(tmp_path / "checkpoints", 2, complete=True)
    ckpt = Checkpointer(None, tmp_path, CheckpointConfig(), ep_size=1)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        ckpt.resume_path("none")
    with pytest.raises(CheckpointError, match="is not a complete omni-ds checkpoint"):
        ckpt.resume_path(str(tmp_path / "nowhere"))
    assert ckpt.resume_path("auto") == tmp_path / "checkpoints" / "step_2"


def test_save_policy_by_steps_and_by_minutes(tmp_path):
    from omni_ds.ckpt.saver import Checkpointer

    by_steps = Checkpointer(None, tmp_path, CheckpointConfig(every_steps=5), ep_size=1)
    assert [s for s in range(1, 16) if by_steps.due(s)] == [5, 10, 15]
    never = Checkpointer(None, tmp_path, CheckpointConfig(every_steps=0), ep_size=1)
    assert not any(never.due(s) for s in range(1, 100))
    by_time = Checkpointer(
        None, tmp_path, CheckpointConfig(every_steps=0, every_minutes=0.5 / 60), ep_size=1
    )
    assert not by_time.due(1)
    time.sleep(0.6)
    assert by_time.due(2)
