"""omni_ds.dist: launch detection, accelerator choice, and expert-parallel MoE over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from harness import RankFailure, run_command, run_function

from omni_ds import dist


def test_torchrun_style_environment_is_read_as_is():
    env = dist.detect_launch_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "node7", "MASTER_PORT": "29600"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 29600, "env")


def test_srun_step_environment_is_mapped_to_torch_variables():
    env = dist.detect_launch_env(
        {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "20007",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "4"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 4, 1, 2)
    assert env.master_addr == "gpu07"
    assert env.master_port == 20007
    assert env.launcher == "slurm"


def test_sbatch_script_outside_srun_is_a_single_process():
    # The batch script sees the allocation's SLURM_NTASKS but is one process: never wait for peers.
    env = dist.detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize(
    "nodelist, first", [("n[1-2]", "n1"), ("gpu-a[003,007],gpu-b1", "gpu-a003"), ("solo", "solo")]
)
def test_slurm_first_host(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # exercise the parser, not scontrol
    assert dist.slurm_first_host(nodelist) == first


def _plain_env() -> dict[str, str]:
    drop = ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}


@pytest.mark.distributed
def test_cpu_host_picks_cpu_accelerator_and_gloo_with_nothing_set():
    assert not torch.cuda.is_available(), "this test describes a CPU-only host"
    out = subprocess.run(
        [sys.executable, "-m", "omni_ds.cli", "env", "--init"],
        env=_plain_env(), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["accelerator"] == "cpu"
    assert report["backend"] == "gloo"
    assert report["launch"]["launcher"] == "single"
    assert report["all_reduce_sum"] == 1.0
    # DeepSpeed's "Setting accelerator to CPU" warning and the shm-op build are gone.
    assert "Setting accelerator" not in out.stdout + out.stderr
    assert "built successfully" not in out.stdout + out.stderr


@pytest.mark.distributed
def test_two_ranks_share_cores_and_all_reduce():
    ranks = run_command(["omni-ds", "env", "--init"], nprocs=2, timeout=120)
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in ranks]
    assert [r["launch"]["rank"] for r in reports] == [0, 1]
    assert all(r["all_reduce_sum"] == 3.0 for r in reports)
    expected = int(os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() // 2))
    assert all(r["threads"] == expected for r in reports)


def _dies_on_rank_one():
    if os.environ["RANK"] == "1":
        raise SystemExit("rank one gives up")
    import time

    time.sleep(60)


@pytest.mark.distributed
def test_harness_fails_fast_with_the_dead_rank_stderr():
    import time

    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank one gives up"):
        run_function(_dies_on_rank_one, nprocs=2, timeout=50)
    assert time.monotonic() - start < 30


def _moe_ep2_forward_backward() -> dict:
    """4 experts over 2 ranks (ep_size=2): compare with the same 4 experts in one ep_size=1 layer."""
    from deepspeed.moe.layer import MoE

    info = dist.init_distributed()
    torch.manual_seed(0)
    d = 16
    expert = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.GELU(), torch.nn.Linear(32, d))
    kw = dict(hidden_size=d, expert=expert, num_experts=4, k=1, capacity_factor=4.0, use_rts=False)
    moe = MoE(ep_size=2, **kw)
    moe.set_deepspeed_parallelism()
    torch.manual_seed(100 + info.rank)  # each rank's experts and tokens are its own
    for p in moe.deepspeed_moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(24, d)

    out, l_aux, _ = moe(x)
    (out.square().sum() + l_aux).backward()

    # The same four experts in one ep_size=1 layer, computed on this rank's tokens alone.
    ref = MoE(ep_size=1, **kw)
    ref.deepspeed_moe.gate.wg.weight.data.copy_(moe.deepspeed_moe.gate.wg.weight.data)
    local = list(moe.deepspeed_moe.experts.deepspeed_experts)
    for e, ref_expert in enumerate(ref.deepspeed_moe.experts.deepspeed_experts):
        owner, slot = divmod(e, 2)
        for p_ref, p in zip(ref_expert.parameters(), local[slot].parameters()):
            buf = p.data.clone()
            torch.distributed.broadcast(buf, src=owner)
            p_ref.data.copy_(buf)
    ref_out, ref_aux, _ = ref(x)
    (ref_out.square().sum() + ref_aux).backward()

    # Expert grads under ep=2 sum the tokens of both ranks; sum the reference's over ranks too.
    expert_diff = 0.0
    for e, ref_expert in enumerate(ref.deepspeed_moe.experts.deepspeed_experts):
        owner, slot = divmod(e, 2)
        for p_ref, p in zip(ref_expert.parameters(), local[slot].parameters()):
            g = p_ref.grad.clone()
            torch.distributed.all_reduce(g)
            if owner == info.rank:
                expert_diff = max(expert_diff, (g - p.grad).abs().max().item())
    total = out.square().sum().detach().reshape(1)
    torch.distributed.all_reduce(total)
    result = {
        "rank": info.rank,
        "finite": bool(torch.isfinite(out).all() and torch.isfinite(l_aux)),
        "out_diff": (out - ref_out).abs().max().item(),
        "gate_grad_diff": (
            moe.deepspeed_moe.gate.wg.weight.grad - ref.deepspeed_moe.gate.wg.weight.grad
        )
        .abs()
        .max()
        .item(),
        "expert_grad_diff": expert_diff,
        "global_sum": total.item(),
    }
    dist.shutdown()
    return result


@pytest.mark.distributed
def test_deepspeed_moe_expert_parallel_all_to_all_over_gloo():
    results = run_function(_moe_ep2_forward_backward, nprocs=2, timeout=180)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["finite"]
        assert r["out_diff"] < 1e-5
        assert r["gate_grad_diff"] < 1e-5
        assert r["expert_grad_diff"] < 1e-4
    assert results[0]["global_sum"] == results[1]["global_sum"]
