"""The expert kernels of grouped dispatch: ``loop`` and ``grouped_mm`` (``torch._grouped_mm``)
give the same outputs and gradients; ``auto`` picks by device; a forced kernel that cannot run,
and invalid settings, fail with the key, the value and the fix.

(CUDA paths: ``tests/test_gpu.py``.)
"""

from __future__ import annotations

import pytest
import torch
from test_moe_dispatch import grads, inputs, layer, relative_diff

from omni_ds.config.model import ModelConfig, MoEConfig
from omni_ds.errors import ConfigError
from omni_ds.model.dispatch import grouped_mm_problem, resolve_kernel
from omni_ds.model.moe import MoEFeedForward
from omni_ds.model.router import Router

needs_grouped_mm = pytest.mark.skipif(
    bool(grouped_mm_problem("cpu", None, torch.float32)),
    reason=grouped_mm_problem("cpu", None, torch.float32),
)


@needs_grouped_mm
@pytest.mark.parametrize(
    "k, dropless", [(1, True), (2, False)], ids=["top1-dropless", "top2-drops"]
)
def test_grouped_mm_equals_loop_fp32(k, dropless):
    loop, gmm = (
        layer(k, dropless, "grouped", kernel="loop"),
        layer(k, dropless, "grouped", kernel="grouped_mm"),
    )
    for seed in range(2):
        x, pad = inputs(seed, [37, 20, 29])
        a, b = grads(loop, x, pad, seed), grads(gmm, x, pad, seed)
        assert a.keys() == b.keys() and all(v is not None for v in b.values())
        for name in a:
            assert relative_diff(b[name], a[name]) < 1e-6, name


@needs_grouped_mm
def test_grouped_mm_equals_loop_in_bf16_weights_and_under_autocast():
    loop, gmm = (
        layer(1, True, "grouped", kernel="loop"),
        layer(1, True, "grouped", kernel="grouped_mm"),
    )
    x, pad = inputs(3, [40, 25])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 matmuls
        a, b = grads(loop, x, pad, 3), grads(gmm, x, pad, 3)
    assert b["out"].dtype == torch.float32  # the combine is fp32, as the loop's
    for name in a:
        assert relative_diff(b[name], a[name]) < 2e-2, name
    loop.to(torch.bfloat16), gmm.to(torch.bfloat16)  # as DeepSpeed's bf16 mode holds the module
    xb = x.detach().bfloat16().requires_grad_()
    a, b = grads(loop, xb, pad, 4), grads(gmm, xb, pad, 4)
    assert b["out"].dtype == torch.bfloat16
    for name in a:
        assert relative_diff(b[name].float(), a[name].float()) < 2e-2, name


@needs_grouped_mm
def test_grouped_mm_gives_experts_without_rows_a_zero_gradient():
    gmm = layer(1, True, "grouped", kernel="grouped_mm")
    gmm.router.wg.weight.data[0] += 50.0  # every frame to expert 0
    x, pad = inputs(0, [12, 9])
    got = grads(gmm, x, pad, 0)
    idle = got["moe.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"]
    assert idle is not None and not idle.any()
    assert got["moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"].abs().sum() > 0


def test_auto_takes_the_loop_on_cpu_and_forced_kernels_are_kept():
    ffn = layer(1, True, "grouped")
    x = torch.randn(8, 16)
    assert resolve_kernel("auto", x, ffn.experts) == "loop"
    assert resolve_kernel("loop", x, ffn.experts) == "loop"
    if not grouped_mm_problem("cpu", None, torch.float32):
        assert resolve_kernel("grouped_mm", x, ffn.experts) == "grouped_mm"


def test_forced_grouped_mm_that_cannot_run_names_the_reason_and_the_fix():
    cfg = MoEConfig(router="switch", num_experts=4, dropless=True, expert_kernel="grouped_mm")
    ffn = MoEFeedForward(cfg, 16, 10, router=Router(cfg, 16))  # 10 bf16 values: 20-byte rows
    x = torch.randn(2, 6, 16).bfloat16()
    with pytest.raises(
        RuntimeError, match=r"expert_kernel = 'grouped_mm'.*multiples of 8.*use expert_kernel: loop"
    ):
        ffn.to(torch.bfloat16)(x)


@pytest.mark.parametrize(
    "moe, model, match",
    [
        ({"expert_kernel": "cutlass"}, {}, "use auto, loop or grouped_mm"),
        ({"expert_kernel": "loop", "dispatch": "stock"}, {}, "applies to dispatch: grouped"),
        ({"expert_kernel": "grouped_mm"}, {"d_ff": 1020}, r"d_ff \(1020\) to be multiples of 8"),
    ],
)
def test_invalid_expert_kernel_settings_fail_early(moe, model, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(moe=MoEConfig(**moe), **model)
