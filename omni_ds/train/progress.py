"""What a person watching a run sees on rank 0's stderr.

On a terminal (and ``train.progress_bar``): a tqdm bar. Anywhere else (a SLURM log file, a pipe)
a bar would be one endless ``\\r``-joined line, so instead one plain line per logged step and per
dev evaluation:

    step 20/300 | loss 3.412 | ctc 3.398 | lr 1.00e-03 | grad_norm 2.14 | audio 95.3 s/s | mfu 0.41% | eta 0:04:31 | skipped 0
    dev dev @ step 100 | loss 2.345 | wer 85.21% | utterances 200
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import TextIO


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def _skipped(values: dict[str, float]) -> str:
    reasons = {k.split("/", 1)[1]: int(v) for k, v in values.items() if k.startswith("skipped/")}
    reasons["nonfinite"] = int(values.get("nonfinite_skipped", 0))
    listed = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if v)
    total = sum(reasons.values())
    return f"{total} ({listed})" if listed else str(total)


def train_line(step: int, total: int, values: dict[str, float], eta_seconds: float) -> str:
    """One plain progress line from a metrics record (``Trainer._log_values``)."""
    parts = [
        f"step {step}/{total}",
        f"loss {values['loss']:.4g}",
        f"ctc {values['ctc']:.4g}",
        f"lr {values['lr']:.2e}",
        f"grad_norm {values['grad_norm']:.3g}",
        f"audio {values['audio_seconds_per_s']:.1f} s/s",
        f"mfu {100 * values['mfu']:.2f}%",
        f"eta {_eta(eta_seconds)}",
        f"skipped {_skipped(values)}",
    ]
    return " | ".join(parts)


def dev_line(step: int, name: str, values: dict[str, float]) -> str:
    """One plain line for a dev evaluation (``dev_eval.dev_scores``; WER as a fraction)."""
    parts = [f"dev {name} @ step {step}", f"loss {values['loss']:.4g}",
             f"wer {100 * values['wer']:.2f}%"]  # fmt: skip
    if "utterances" in values:
        parts.append(f"utterances {int(values['utterances'])}")
    return " | ".join(parts)


class Progress:
    """Rank 0's progress display; on other ranks (``enabled`` false) every call does nothing."""

    def __init__(self, total: int, initial: int, *, enabled: bool, bar: bool,
                 stream: TextIO | None = None):  # fmt: skip
        self.total, self.initial = total, initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._start = time.perf_counter()
        self._bar = None
        if enabled and bar and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                             file=self.stream)  # fmt: skip

    def step(self, step: int, loss: float) -> None:
        """Every optimizer step: advance the bar."""
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}")

    def _print(self, line: str) -> None:
        if self.enabled and self._bar is None:
            print(line, file=self.stream, flush=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Every logged step: a plain line (without a bar)."""
        done = step - self.initial
        rate = (time.perf_counter() - self._start) / done if done > 0 else math.nan
        self._print(train_line(step, self.total, values, rate * (self.total - step)))

    def dev(self, step: int, name: str, values: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.write(dev_line(step, name, values))
        else:
            self._print(dev_line(step, name, values))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
