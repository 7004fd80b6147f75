"""Training metrics: one JSON line per logged step, the same numbers to DeepSpeed's monitors
(TensorBoard, CSV, W&B as the DeepSpeed JSON enables them), and a tqdm bar on rank 0.

Throughput and MFU: a step's model FLOPs are estimated nanoGPT-style on *real* (non-pad) encoder
frames, ``6 × active parameters`` per frame (forward + backward, only the top_k experts a frame
uses) plus ``12 × layers × d_model × T`` per frame for attention scores over an utterance of T
frames; the front end is left out. MFU divides the achieved rate by the device's peak dense rate
(``train.peak_tflops``, a table of GPUs, or a matmul measured once on CPUs).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from omni_ds import dist

# Peak dense bf16 TFLOP/s per GPU (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    """The peak dense TFLOP/s of one device: configured, looked up, or measured (CPU)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
        return 0.0
    # CPU: the best of a few fp32 matmuls with this process's thread count.
    n = 512
    g = torch.Generator().manual_seed(0)  # never the global RNG: exact resume depends on it
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def step_flops(active_params: int, n_layers: int, d_model: int, frame_lens: torch.Tensor) -> float:
    """Training FLOPs of one batch (module docstring) from its encoder frame counts."""
    frames = float(frame_lens.sum())
    attention = 12.0 * n_layers * d_model * float((frame_lens.double() ** 2).sum())
    return 6.0 * active_params * frames + attention


def routing_summary(routing) -> dict[str, float]:
    """Per MoE layer: routing entropy and each expert's usage fraction."""
    out: dict[str, float] = {}
    for layer, stats in enumerate(routing or []):
        out[f"routing/layer{layer}/entropy"] = float(stats.entropy)
        for e, u in enumerate(stats.usage.tolist()):
            out[f"routing/layer{layer}/usage{e}"] = float(u)
    return out


def expert_parallel_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of all gradients with every expert counted once (for ZeRO stage 0, where
    DeepSpeed reports none and its clipping norm mis-counts experts, DeepSpeed issue 8475).

    Dense gradients are identical on every rank after the all-reduce; expert gradients differ
    between the ranks of an expert-parallel group, so their squares are summed over that group.
    """
    from deepspeed.utils import groups

    dense = torch.zeros((), dtype=torch.float64)
    experts: dict[str, torch.Tensor] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "allreduce", True) is False:
            experts[p.group_name] = experts.get(p.group_name, 0) + sq
        else:
            dense += sq
    total = float(dense)
    for name, sq in sorted(experts.items()):
        group = groups._get_expert_parallel_group(name) if tdist.is_initialized() else None
        total += dist.sum_over_group(float(sq), group)
    return math.sqrt(total)


RESUME = "resume"
"""``kind`` of the line that marks a (re)start: records after it supersede earlier ones of later
steps (see :func:`read_records`)."""


class JsonLines:
    """An append-only JSON-lines file of records with a ``step``; never truncated: a resume
    appends a :data:`RESUME` line instead (:meth:`mark_resume`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def mark_resume(self, step: int, **info) -> None:
        """Record that training (re)starts after ``step``: a crash may have logged steps past
        the checkpoint, which the resumed run redoes; readers keep the redone records."""
        if step > 0 or self.path.stat().st_size > 0:
            self.write({"kind": RESUME, "step": step, "time": time.time(), **info})

    def close(self) -> None:
        self._file.close()


def read_records(path: Path) -> list[dict]:
    """The records of a :class:`JsonLines` file as the run stands: a :data:`RESUME` line at step
    N drops the earlier records past step N (its attempt redid them); the markers themselves
    are left out."""
    records: list[dict] = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == RESUME:
            records = [r for r in records if r["step"] <= record["step"]]
        else:
            records.append(record)
    return records


class MetricsLog:
    """Rank 0 writes ``metrics.jsonl`` and DeepSpeed monitor events; other ranks do nothing."""

    def __init__(self, run_dir: Path, monitor=None, *, rank: int = 0):
        self.monitor = monitor
        self.lines = JsonLines(Path(run_dir) / "metrics.jsonl") if rank == 0 else None

    def mark_resume(self, step: int, **info) -> None:
        if self.lines is not None:
            self.lines.mark_resume(step, **info)

    def write(self, step: int, values: dict[str, float], kind: str = "train",
              samples: int | None = None) -> None:  # fmt: skip
        """One record at optimizer step ``step``; ``samples`` is DeepSpeed's ``global_samples``
        then (W&B's step axis, see :func:`write_events`)."""
        if self.lines is None:
            return
        self.lines.write({"kind": kind, "step": step, **values})
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            events = [(f"{kind}/{k}", float(v), step) for k, v in values.items()]
            write_events(self.monitor, events, step, step if samples is None else samples)

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()


def write_events(monitor, events: list[tuple], step: int, samples: int) -> None:
    """Send ``events`` (name, value, step) to DeepSpeed's enabled monitors.

    TensorBoard, CSV and Comet get them at the optimizer step. A W&B run has one step counter
    that must only grow, and DeepSpeed's engine logs its own ``Train/Samples/*`` events to it at
    ``global_samples``; so W&B gets these at that count too, with ``train/step`` beside them
    (``omni_ds.train.engine.describe_run`` makes it the x-axis of every omni-ds chart).
    """
    for sink in (monitor.tb_monitor, monitor.csv_monitor, monitor.comet_monitor):
        if sink is not None:
            sink.write_events(events)
    if monitor.wandb_monitor is not None:
        at_samples = [(name, value, samples) for name, value, _ in events]
        monitor.wandb_monitor.write_events([*at_samples, ("train/step", step, samples)])


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """The records of ``kind`` in a run's ``metrics.jsonl``, in file order, as the run stands
    after its resumes (:func:`read_records`)."""
    return [r for r in read_records(Path(run_dir) / "metrics.jsonl") if r.get("kind") == kind]
