"""omni_ds.ckpt.saver: exact resume (RNG and data state included), atomicity, pruning, policy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from harness import run_function

from omni_ds.ckpt.format import (
    MANIFEST,
    complete_checkpoints,
    latest_checkpoint,
    tag_of,
    verify,
    write_manifest,
)
from omni_ds.config.train import CheckpointConfig
from omni_ds.errors import CheckpointError

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


def _copy_tag(straight, tmp_path, tag: str = "step_6") -> Path:
    return Path(shutil.copytree(straight[0] / "checkpoints" / tag, tmp_path / tag))


@pytest.mark.distributed
def test_every_file_has_a_checksum_and_a_same_size_change_is_caught(straight, tmp_path, capsys):
    """64 bytes flipped inside rank 0's ZeRO shard keep its size: the manifest's checksum
    catches it, in ``omni-ds ckpt verify`` and before export reads the checkpoint."""
    from omni_ds.ckpt.consolidate import consolidate
    from omni_ds.cli import main

    tag = _copy_tag(straight, tmp_path)
    files = json.loads((tag / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in tag.iterdir()} - {MANIFEST}
    assert all(len(entry["xxh3_128"]) == 32 for entry in files.values())
    assert verify(tag) == [] and main(["ckpt", "verify", str(tag)]) == 0
    shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[-2000:-1936] = bytes(b ^ 0x5A for b in data[-2000:-1936])
    shard.write_bytes(bytes(data))
    (problem,) = verify(tag)
    assert problem == f"{shard} does not match its checksum (its bytes changed after the save)"
    capsys.readouterr()
    assert main(["ckpt", "verify", str(tag)]) == 1
    assert str(shard) in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="does not verify: .*zero_pp_rank_0"):
        consolidate(tag)


@pytest.mark.distributed
def test_one_byte_changed_in_any_kind_of_file_is_detected(straight, tmp_path):
    tag = _copy_tag(straight, tmp_path)
    kinds = ["mp_rank_00_model_states.pt", "layer_1_expert_2_mp_rank_00_model_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", MANIFEST]  # fmt: skip
    for name in kinds:
        original = (tag / name).read_bytes()
        for at in (0, len(original) // 2, len(original) - 1):
            damaged = bytearray(original)
            damaged[at] ^= 0x01
            (tag / name).write_bytes(bytes(damaged))
            assert verify(tag), (name, at)
        (tag / name).write_bytes(original[:-1])
        assert verify(tag), name
        (tag / name).write_bytes(original)
        assert verify(tag) == []


def _plant_callable(tag: Path, name: str, marker: Path) -> None:
    """Add a pickled ``os.system`` call to ``tag/name`` and make the manifest match it (someone
    who can write a checkpoint can write its manifest)."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(tag / name, weights_only=False)
    state["ds_version"] = Payload()
    torch.save(state, tag / name)
    manifest = json.loads((tag / MANIFEST).read_text())
    write_manifest(tag, step=manifest["step"], world_size=manifest["world_size"],
                   ep_size=manifest["ep_size"])  # fmt: skip
    assert verify(tag) == []


def load_refused(path: str) -> str:
    """:func:`load_on_one_rank`, returning the refusal."""
    try:
        load_on_one_rank(path)
    except CheckpointError as e:
        return str(e)
    return "loaded"


@pytest.mark.distributed
def test_a_checkpoint_carrying_a_pickled_callable_is_refused(straight, tmp_path):
    """In omni-ds's readers (export, reshard) and inside DeepSpeed's own load_checkpoint: the
    payload sits in a ZeRO shard of a checkpoint already laid out for one rank, so only the
    engine reads it."""
    from omni_ds.ckpt.consolidate import consolidate
    from omni_ds.ckpt.reshard import reshard
    from omni_ds.ckpt.zero import ZeroCheckpoint

    marker = tmp_path / "payload-ran"
    tag = _copy_tag(straight, tmp_path)
    _plant_callable(tag, "mp_rank_00_model_states.pt", marker)
    for read in (consolidate, ZeroCheckpoint):
        with pytest.raises(CheckpointError, match="refused: it pickles posix.system"):
            read(tag)

    run = tmp_path / "run" / "checkpoints"
    one_rank = reshard(_copy_tag(straight, run), run / "step_6.reshard-w1-ep1", world_size=1,
                       ep_size=1)  # fmt: skip
    _plant_callable(one_rank, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    (refusal,) = run_function(load_refused, 1, args=(str(run / "step_6"),), timeout=240)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt refused: it pickles posix.system" in refusal
    assert not marker.exists()


def test_write_manifest_digests_what_the_writers_did_not(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"abc")
    (tmp_path / "b.pt").write_bytes(b"defg")
    write_manifest(tmp_path, step=1, world_size=1, ep_size=1, digests={"a.pt": (3, "given")})
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert files["a.pt"] == {"size": 3, "xxh3_128": "given"}
    assert files["b.pt"]["size"] == 4 and len(files["b.pt"]["xxh3_128"]) == 32
