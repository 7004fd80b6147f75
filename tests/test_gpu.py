"""GPU-only tests (marker ``gpu``): every path that runs only on a CUDA device. Skipped without one.

    pytest -m gpu tests/test_gpu.py                          # part 1 of benchmarks/gpu_check.sh

bf16 and fp16 forward/backward of the model and through DeepSpeed engines (NCCL, one rank); the
collectives of ``omni_ds.dist`` and the expert all-to-all with CUDA tensors under NCCL; the front
end, both expert kernels of the dispatch and the CTC loss on CUDA against the CPU; the CUDA timing
and ``max_memory_allocated`` paths of the benchmarks. ``OMNI_DS_GPU_TEST_DEVICE=cpu`` rehearses the
same tests on the CPU (gloo instead of NCCL; fp16 engines skipped: DeepSpeed has no CPU fp16), so
they can be run before a GPU is there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from harness import run_function
from test_model import batch, tiny, utterances
from test_moe_dispatch import grads, inputs, layer, relative_diff

from omni_ds.config.model import FrontendConfig
from omni_ds.model.decode import ctc_greedy
from omni_ds.model.dispatch import grouped_mm_problem, resolve_kernel
from omni_ds.model.encoder import EncoderOutput, build_model
from omni_ds.model.frontend import Frontend

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("OMNI_DS_GPU_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def on(data: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in data.items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_model_forward_backward_in_half_precision(dtype):
    """Module held in bf16/fp16 (DeepSpeed's mode), and autocast over fp32 weights."""
    if dtype == "fp16" and not CUDA:
        pytest.skip("fp16 rehearsal needs a GPU")
    half = DTYPES[dtype]
    torch.manual_seed(0)
    model = build_model(tiny("model.vocab_size=13")).to(DEVICE)
    data = on(batch(utterances()[:3]))
    model.to(half)
    out = model(data["audio"], data["audio_lens"])
    loss = model.loss(out, data["tokens"], data["token_lens"])
    assert out.logits.dtype == half and loss.total.dtype == torch.float32
    loss.total.backward()
    assert all(p.grad.dtype == half and p.grad.isfinite().all() for p in model.parameters())
    model.float().zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=half):
        out = model(data["audio"], data["audio_lens"])
        loss = model.loss(out, data["tokens"], data["token_lens"])
    assert out.logits.dtype == half and loss.ctc.dtype == torch.float32
    loss.total.backward()
    assert loss.total.isfinite() and model.head.weight.grad.dtype == torch.float32
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def _engine_worker(ds_path: str, steps: int) -> dict:
    from omni_ds import dist
    from omni_ds.train.engine import build_engine

    with dist.distributed() as info:
        torch.manual_seed(0)
        ds = json.loads(Path(ds_path).read_text())
        ds.pop("tensorboard", None)
        engine = build_engine(build_model(tiny("model.vocab_size=13")).to(info.device), ds)
        before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        data = {k: v.to(info.device) for k, v in batch(utterances()[:4]).items()}
        losses = []
        for _ in range(steps):
            out = engine(data["audio"], data["audio_lens"])
            loss = engine.module.loss(out, data["tokens"], data["token_lens"]).total
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        moved = [
            n for n, p in engine.module.named_parameters() if not torch.equal(p.float(), before[n])
        ]
        dtypes = {str(p.dtype) for p in engine.module.parameters()}
        return {"backend": info.backend, "device": str(info.device), "losses": losses,
                "moved": moved, "params": len(before), "dtypes": sorted(dtypes),
                "global_steps": engine.global_steps, "skipped": engine.skipped_steps}  # fmt: skip


@pytest.mark.parametrize("ds", ["zero2_bf16", "zero2_fp16"])
def test_deepspeed_engine_trains_in_half_precision_on_one_rank(ds):
    if ds == "zero2_fp16" and not CUDA:
        pytest.skip("DeepSpeed refuses fp16 on the CPU")
    (r,) = run_function(_engine_worker, 1, args=(str(REPO / "ds_configs" / f"{ds}.json"), 6),
                        timeout=240)  # fmt: skip
    assert r["backend"] == ("nccl" if CUDA else "gloo") and r["device"].startswith(DEVICE.type)
    assert r["dtypes"] == [f"torch.{'bfloat16' if ds == 'zero2_bf16' else 'float16'}"]
    assert all(v == v and abs(v) < 1e4 for v in r["losses"]), r["losses"]  # finite
    # fp16's dynamic loss scale may skip its first steps on overflow, never all of them.
    assert r["global_steps"] == 6 and r["skipped"] < 6
    # Experts that no frame chose may keep their weights (bf16 rounds the tiny weight decay away).
    assert {"router.wg.weight", "head.weight", "frontend.subsample.proj.weight"} <= set(r["moved"])
    assert len(r["moved"]) > 0.8 * r["params"], r["moved"]


def _collectives_worker() -> dict:
    from omni_ds import dist
    from omni_ds.model.dispatch import _expert_parallel, run_experts

    with dist.distributed() as info:
        got = {
            "backend": info.backend,
            "agree": dist.agree(True, False),
            "sum": dist.sum_over_ranks({"a": 1.5, "b": 2.0}),
            "mean": dist.mean_over_ranks({"a": 3.0}),
            "group": dist.sum_over_group(2.5, None),
            "counts": dist.sum_counts_over_ranks({"x": 3, "y": 1}),
            "broadcast": dist.broadcast_object({"k": [1, 2]}),
            "gather": dist.gather_objects(7),
        }
        dist.barrier()
        # The expert all-to-all (counts, then rows with split sizes, and back) on CUDA tensors.
        ffn = layer(1, True, "grouped").to(info.device)
        x = torch.randn(20, 16, device=info.device, requires_grad=True)
        counts = torch.tensor([5, 0, 9, 6], device=info.device)
        group = torch.distributed.group.WORLD
        y = _expert_parallel(x, counts, ffn.experts, group, 1, "loop")
        want = run_experts(x, counts, ffn.experts, "loop")
        y.square().sum().backward()
        got["all_to_all"] = relative_diff(y.detach(), want.detach())
        got["all_to_all_grad"] = bool(x.grad.isfinite().all() and x.grad.abs().sum() > 0)
        return got


def test_collectives_and_expert_all_to_all_on_one_rank():
    (r,) = run_function(_collectives_worker, 1, timeout=180)
    assert r["backend"] == ("nccl" if CUDA else "gloo")
    assert r["agree"] == [True, False]
    assert r["sum"] == {"a": 1.5, "b": 2.0} and r["mean"] == {"a": 3.0} and r["group"] == 2.5
    assert r["counts"] == {"x": 3, "y": 1} and r["broadcast"] == {"k": [1, 2]}
    assert r["gather"] == [7]
    assert r["all_to_all"] < 1e-6 and r["all_to_all_grad"]


def test_frontend_on_the_device_matches_the_cpu():
    torch.manual_seed(0)
    for subsampling in ("stack", "conv"):
        frontend = Frontend(FrontendConfig(subsampling=subsampling), 64).eval()
        data = batch(utterances()[:3])
        with torch.no_grad():
            want, want_lens = frontend(data["audio"], data["audio_lens"])
            got, got_lens = frontend.to(DEVICE)(
                data["audio"].to(DEVICE), data["audio_lens"].to(DEVICE)
            )
        assert torch.equal(got_lens.cpu(), want_lens)
        assert relative_diff(got.cpu(), want) < 1e-4, subsampling
        frontend.train()  # SpecAugment's masks are drawn on the device
        masked, _ = frontend(data["audio"].to(DEVICE), data["audio_lens"].to(DEVICE))
        assert masked.device.type == DEVICE.type and masked.isfinite().all()


@pytest.mark.parametrize(
    "k, dropless", [(1, True), (2, False)], ids=["top1-dropless", "top2-drops"]
)
def test_dispatch_kernels_agree_on_the_device_in_bf16(k, dropless):
    """stock, loop and grouped_mm on the device in bf16: same outputs and gradients."""
    layers = {
        "stock": layer(k, dropless, "stock"),
        "loop": layer(k, dropless, "grouped", kernel="loop"),
        "grouped_mm": layer(k, dropless, "grouped", kernel="grouped_mm"),
    }
    for ffn in layers.values():
        ffn.to(DEVICE, torch.bfloat16)
    x, pad = inputs(0, [37, 20, 29])
    x = x.detach().to(DEVICE, torch.bfloat16).requires_grad_()
    got = {name: grads(ffn, x, pad.to(DEVICE), 0) for name, ffn in layers.items()}
    for name in ("loop", "grouped_mm"):
        for key, want in got["stock"].items():
            assert relative_diff(got[name][key].float(), want.float()) < 3e-2, (name, key)
    rows = x.reshape(-1, x.shape[-1])
    fast = CUDA and torch.cuda.get_device_capability(DEVICE)[0] >= 9
    assert resolve_kernel("auto", rows, layers["loop"].experts) == (
        "grouped_mm" if fast else "loop"
    )
    assert not grouped_mm_problem(DEVICE.type, DEVICE.index, torch.bfloat16)


def test_grouped_mm_on_the_device_with_experts_that_get_no_rows():
    """Empty groups in ``torch._grouped_mm`` (early CUDA builds hung on them): zero gradients."""
    gmm = layer(1, True, "grouped", kernel="grouped_mm").to(DEVICE, torch.bfloat16)
    gmm.router.wg.weight.data[0] += 50.0  # every frame to expert 0
    x, pad = inputs(0, [12, 9])
    got = grads(gmm, x.detach().to(DEVICE, torch.bfloat16).requires_grad_(), pad.to(DEVICE), 0)
    idle = got["moe.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"]
    assert idle is not None and not idle.any()
    assert got["moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"].abs().sum() > 0
    assert got["x"].isfinite().all()


def test_dispatch_kernels_agree_on_the_device_in_fp32_or_say_why_not():
    loop = layer(1, True, "grouped", kernel="loop").to(DEVICE)
    x, pad = inputs(1, [30, 18])
    x = x.detach().to(DEVICE).requires_grad_()
    want = grads(loop, x, pad.to(DEVICE), 1)
    gmm = layer(1, True, "grouped", kernel="grouped_mm").to(DEVICE)
    problem = grouped_mm_problem(DEVICE.type, DEVICE.index, torch.float32)
    if problem:  # a forced kernel that this torch cannot run names the reason and the fix
        with pytest.raises(RuntimeError, match="use expert_kernel: loop"):
            grads(gmm, x, pad.to(DEVICE), 1)
        return
    got = grads(gmm, x, pad.to(DEVICE), 1)
    for key in want:
        assert relative_diff(got[key], want[key]) < 1e-3, key  # TF32 may serve fp32 matmuls


def test_ctc_loss_and_greedy_decoding_on_the_device_match_the_cpu():
    torch.manual_seed(0)
    model = build_model(tiny("model.vocab_size=13")).to(DEVICE).eval()
    data = on(batch(utterances()[:4]))
    out = model(data["audio"], data["audio_lens"])
    logits = out.logits.detach().requires_grad_()
    on_device = EncoderOutput(logits, *out[1:])
    loss = model.loss(on_device, data["tokens"], data["token_lens"])
    loss.ctc.backward()
    cpu_logits = logits.detach().cpu().requires_grad_()
    cpu_out = EncoderOutput(cpu_logits, *(t.cpu() if torch.is_tensor(t) else t for t in out[1:]))
    cpu_loss = model.loss(cpu_out, data["tokens"].cpu(), data["token_lens"].cpu())
    cpu_loss.ctc.backward()
    got, want = float(loss.ctc.detach()), float(cpu_loss.ctc.detach())
    assert abs(got - want) < 1e-4 * (1 + abs(want))
    assert relative_diff(logits.grad.cpu(), cpu_logits.grad) < 1e-4
    assert ctc_greedy(logits.detach(), out.out_lens) == ctc_greedy(
        cpu_logits.detach(), out.out_lens.cpu()
    )


def test_benchmark_timing_and_peak_memory_paths_on_the_device(monkeypatch):
    """CUDA events and max_memory_allocated in benchmarks/moe_layer.py and router_step.py."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import moe_layer
    import router_step

    monkeypatch.setattr(moe_layer, "D", 64)
    monkeypatch.setattr(moe_layer, "FF", 256)
    assert moe_layer.device().type == DEVICE.type
    if not CUDA:
        moe_layer._return_freed_memory()
    kernels, skipped = moe_layer.available(list(moe_layer.KERNELS), "bf16")
    assert kernels == list(moe_layer.KERNELS) and not skipped
    row = moe_layer.measure("skewed", 2048, 1, kernels, "bf16")
    assert all(row["seconds"][k] > 0 for k in kernels), row
    assert all(row["peak_bytes"][k] > 0 for k in kernels), row
    # The stock buffer holds the busiest expert's count for every expert.
    assert row["peak_bytes"]["stock"] > row["peak_bytes"]["loop"], row
    assert router_step.matmul_tflops(DEVICE, torch.bfloat16, 1024) > 0
    router_step.reset_peak(DEVICE)
    base = router_step.allocated(DEVICE)
    held = torch.ones(2**24, device=DEVICE)  # 64 MiB
    assert router_step.peak(DEVICE) - base >= held.numel() * 4 * 0.9
