"""Running an exported model over audio: batched forward, CTC decoding, routing collection.

loaded = load_model_dir("models/omni")
transcriber = Transcriber(loaded, beam_size=0)            # 0 = greedy, else prefix beam
result = transcribe_batches(transcriber, batches, desc="dev")   # keys, refs, hyps
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from omni_ds.model.decode import ctc_beam_search, ctc_greedy


class Transcriber:
    """Decodes batches with a loaded model; optionally feeds the routing to a collector."""

    def __init__(self, loaded, beam_size: int = 0, token_topk: int | None = None):
        if beam_size < 0:
            raise ValueError(f"beam_size must be 0 (greedy) or positive, got {beam_size}")
        self.model = loaded.model
        self.loaded = loaded
        self.beam_size = beam_size
        self.token_topk = token_topk
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def decode(
        self, audio: torch.Tensor, audio_lens: torch.Tensor, collector=None, keys=()
    ) -> list[list[int]]:
        """Token ids per utterance; ``collector`` (a ``RoutingCollector``) gets the routing."""
        out = self.model(
            audio.to(self.device), audio_lens.to(self.device), return_stats=collector is not None
        )
        if collector is not None:
            collector.add(out.routing, out.out_lens, keys)
        logits = out.logits.float()
        if self.beam_size:
            return ctc_beam_search(logits, out.out_lens, self.beam_size, self.token_topk)
        return ctc_greedy(logits, out.out_lens)

    def texts(self, ids: list[list[int]]) -> list[str]:
        # Ids past the tokenizer (model.vocab_size may be larger) are never training targets; an
        # undertrained model can still emit them. Dropped, as the training's dev evaluation does.
        tok = self.loaded.tokenizer
        return [tok.decode([i for i in x if i < tok.vocab_size]) for x in ids]


@dataclasses.dataclass
class Transcripts:
    keys: list[str] = dataclasses.field(default_factory=list)
    refs: list[str] = dataclasses.field(default_factory=list)
    hyps: list[str] = dataclasses.field(default_factory=list)

    def write_tsv(self, path) -> None:
        """``key<TAB>reference<TAB>hypothesis`` per utterance, for reading errors by eye."""
        with open(path, "w") as f:
            for row in zip(self.keys, self.refs, self.hyps):
                f.write("\t".join(s.replace("\t", " ").replace("\n", " ") for s in row) + "\n")

    @classmethod
    def read_tsv(cls, path) -> Transcripts:
        """What :meth:`write_tsv` wrote: the texts as they were, but for a tab or line break
        inside one, which reads back as a space."""
        out = cls()
        with open(path) as f:
            for line in f:
                key, ref, hyp = line.rstrip("\n").split("\t")
                out.keys.append(key)
                out.refs.append(ref)
                out.hyps.append(hyp)
        return out


def transcribe_batches(
    transcriber: Transcriber,
    batches: Iterable[dict],
    *,
    collector=None,
    desc: str = "",
    total: int | None = None,
    max_batches: int = 0,
) -> Transcripts:
    """Decode loader batches (``audio``, ``audio_lens``, ``keys``, ``texts``); the progress bar
    counts utterances (``total`` of them, if known)."""
    from tqdm import tqdm

    result = Transcripts()
    with tqdm(desc=desc, total=total, unit="utt", leave=False) as bar:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            ids = transcriber.decode(batch["audio"], batch["audio_lens"], collector, batch["keys"])
            result.keys.extend(batch["keys"])
            result.refs.extend(batch["texts"])
            result.hyps.extend(transcriber.texts(ids))
            bar.update(len(batch["keys"]))
    return result
