"""The routing trace (train.routing_trace_every) and the expert bias of a real multi-rank run.

The 2-rank runs are tests/test_train.py's (ZeRO-2 bf16 with ep_size 2, and the kill -9 resume),
trained with :data:`TRACE_SETS`; :func:`check_trace_and_bias` asserts on what they wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omni_ds.ckpt.export import export_checkpoint
from omni_ds.ckpt.model_dir import load_model_dir
from omni_ds.ckpt.reshard import reshard
from omni_ds.config.experiment import load_config
from omni_ds.errors import ConfigError

EVERY, FRAMES = 5, 64
TRACE_SETS = ("model.moe.expert_bias=true", f"train.routing_trace_every={EVERY}",
              f"train.routing_trace_frames={FRAMES}")  # fmt: skip


def check_trace_and_bias(run: Path, *, steps: int, ranks: int, tmp_path: Path) -> None:
    """The trace has every EVERY-th step once per rank, records of at most FRAMES frames; the
    bias is identical on every rank at every traced step, equals the checkpoint's, survives a
    reshard and an export; ``omni-ds analyze --trace`` draws the plots."""
    from omni_ds.cli import main

    records = []
    for rank in range(ranks):
        path = run / "routing_trace" / f"rank{rank}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(EVERY, steps + 1, EVERY))
        for r in lines:
            assert r["rank"] == rank and len(r["expert"]) == 4 and len(r["load"]) == 4
            assert r["frames"] == len(r["expert"][0]) <= FRAMES
            assert sum(r["load"][0]) > r["frames"]  # load counts every real frame
        assert path.stat().st_size < len(lines) * 4 * FRAMES * 8  # bounded per record
        records.append(lines)
    for step_records in zip(*records):  # bitwise the same bias on every rank, every step
        assert all(r["bias"] == step_records[0]["bias"] for r in step_records)
    layers = records[0][-1]["bias"]  # one router: its one row is what every layer used
    assert len(layers) == 4 and all(row == layers[0] for row in layers)
    last = torch.tensor(layers[0])
    assert last.abs().sum() > 0

    tag = run / "checkpoints" / f"step_{steps}"
    saved = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert torch.equal(saved["router.balance_bias"][0], last)
    assert saved["router.balance_bias"].dtype == torch.float32  # fp32 in a bf16 run
    one = reshard(tag, tmp_path / "w1" / "checkpoints" / tag.name, world_size=1, ep_size=1)
    moved = torch.load(one / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert torch.equal(moved["router.balance_bias"], saved["router.balance_bias"])
    model = load_model_dir(export_checkpoint(run, tmp_path / "model")).model
    assert torch.equal(model.router.balance_bias, saved["router.balance_bias"])

    out = tmp_path / "trace_plots"
    assert main(["analyze", "--trace", str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"trace.png", "trace_load.png", "trace_bias.png"}
    summary = json.loads((out / "trace.json").read_text())
    assert summary["bias_identical_across_ranks"] is True and summary["ranks"] == ranks
    assert len(summary["mean_crosslayer_nmi"]) == steps // EVERY


def test_trace_needs_a_router_and_sane_values():
    from omni_ds.eval import trace_analysis
    from omni_ds.train import metrics

    assert trace_analysis.RESUME == metrics.RESUME  # the reader skips what the writer marks
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="no routing to trace"):
        load_config(tiny, ["model.moe.router=dense", "train.routing_trace_every=10"])
    with pytest.raises(ConfigError, match="routing_trace_every"):
        load_config(tiny, ["train.routing_trace_every=-1"])
    with pytest.raises(ConfigError, match="routing_trace_frames"):
        load_config(tiny, ["train.routing_trace_frames=0"])
