"""The Python API: load an exported model, transcribe audio, look at its routing.

    import omni_ds

    model = omni_ds.load_model("models/omni", device="cpu")
    model.transcribe("a.flac")                      # one input -> one text
    model.transcribe(["a.flac", samples], beam_size=8)   # a list -> a list of texts
    model.routing("a.flac").experts                 # [MoE layers, frames] top-1 expert ids
    model.config.model.moe.router                   # config.json: architecture, tokenizer, ...

An input is a path of any file soundfile reads (any rate, any channels), or an array of samples
(``[samples]`` or ``[samples, channels]``, float in [-1, 1] or int16) at ``sample_rate`` (default
16 kHz). Both are turned into what training saw: mono, 16 kHz, 16-bit; ``channel`` picks one
channel of multi-channel input by number, or ``"mix"`` (the default) averages them. Inputs are decoded in
batches of consecutive inputs holding at most ``batch_seconds`` of padded audio; the texts come
back in input order, the same as ``omni-ds transcribe`` prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from data_pipeline.audio import SAMPLE_RATE, read_float, to_int16_16k
from data_pipeline.reader import pad
from omni_ds.ckpt.model_dir import LoadedModel, ModelDirConfig, load_model_dir
from omni_ds.eval.inference import Transcriber

Audio = str | Path | np.ndarray | torch.Tensor


@dataclasses.dataclass
class Routing:
    """The expert choices for one input: one row per MoE layer, one column per encoder frame."""

    experts: np.ndarray
    """``[layers, frames]`` int64: the top-1 expert of each frame in each MoE layer."""
    probs: np.ndarray
    """``[layers, frames]`` float32: the router's probability of that expert."""


def _samples(item: Audio, sample_rate: int, channel: int | str) -> np.ndarray:
    if isinstance(item, str | Path):
        return read_float(str(item), channel=channel)
    audio = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if audio.dtype != np.int16:
        audio = audio.astype(np.float32)
    if audio.ndim not in (1, 2) or audio.shape[0] == 0:
        raise ValueError(f"audio array of shape {audio.shape}: need [samples] or "
                         "[samples, channels] with at least one sample")  # fmt: skip
    return to_int16_16k(audio, sample_rate, channel)[0].astype(np.float32) / 32768.0


class Model:
    """An exported model ready for inference (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, batch_seconds: float = 200.0):
        if batch_seconds <= 0:
            raise ValueError(f"batch_seconds: {batch_seconds} must be positive, e.g. 200")
        self.loaded = loaded
        self.batch_seconds = batch_seconds

    @property
    def config(self) -> ModelDirConfig:
        """``config.json``: ``model`` (the architecture), ``tokenizer``, ``sample_rate``, version."""
        return self.loaded.config

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    def _batches(self, audio: Sequence[np.ndarray]) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of consecutive inputs within ``batch_seconds`` (longest x count)."""
        start, longest = 0, 0
        for i, a in enumerate(audio):
            longest = max(longest, len(a))
            if i > start and longest * (i + 1 - start) > self.batch_seconds * SAMPLE_RATE:
                yield start, i
                start, longest = i, len(a)
        if audio:
            yield start, len(audio)

    def _load(self, audio: Audio | Sequence[Audio], sample_rate: int, channel: int | str):
        single = isinstance(audio, str | Path | torch.Tensor) or (
            isinstance(audio, np.ndarray) and audio.ndim <= 2 and audio.dtype != object
        )
        items = [audio] if single else list(audio)
        return single, [_samples(x, sample_rate, channel) for x in items]

    def transcribe(
        self,
        audio: Audio | Sequence[Audio],
        *,
        beam_size: int = 0,
        sample_rate: int = SAMPLE_RATE,
        channel: int | str = "mix",
    ) -> str | list[str]:
        """The text of one input, or the texts of a list of inputs; CTC greedy decoding
        (``beam_size`` 0) or a CTC prefix beam search of that width."""
        single, samples = self._load(audio, sample_rate, channel)
        transcriber = Transcriber(self.loaded, beam_size=beam_size)
        texts: list[str] = []
        for start, end in self._batches(samples):
            batch, lens = pad(samples[start:end], np.float32)
            texts.extend(transcriber.texts(transcriber.decode(batch, lens)))
        return texts[0] if single else texts

    @torch.no_grad()
    def routing(
        self,
        audio: Audio | Sequence[Audio],
        *,
        sample_rate: int = SAMPLE_RATE,
        channel: int | str = "mix",
    ) -> Routing | list[Routing]:
        """The expert choices of every MoE layer for each input (a dense model has none)."""
        if self.config.model.moe.router == "dense":
            raise ValueError(f"{self.loaded.model_dir} is a dense model: it has no routing")
        single, samples = self._load(audio, sample_rate, channel)
        result: list[Routing] = []
        for start, end in self._batches(samples):
            batch, lens = pad(samples[start:end], np.float32)
            out = self.loaded.model(batch.to(self.device), lens.to(self.device), return_stats=True)
            bounds = np.cumsum([0, *out.out_lens.tolist()])
            experts = [s.expert[:, 0].cpu().numpy().astype(np.int64) for s in out.routing]
            probs = [s.prob[:, 0].float().cpu().numpy() for s in out.routing]
            for b in range(end - start):
                cut = slice(bounds[b], bounds[b + 1])
                result.append(Routing(np.stack([e[cut] for e in experts]),
                                      np.stack([p[cut] for p in probs])))  # fmt: skip
        return result[0] if single else result


def load_model(path: str | Path, device: str | torch.device | None = None) -> Model:
    """The model exported to ``path`` by ``omni-ds export``, on ``device`` (default: cuda if
    available, else cpu), in eval mode."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Model(load_model_dir(path, device))
