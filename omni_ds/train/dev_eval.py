"""Periodic dev evaluation during training: CTC loss and greedy-decoding WER per dev set.

Every rank decodes its own share of each dev set (the loader gives every rank the same number of
batches, which the MoE all-to-all needs); transcripts are gathered on rank 0, which scores them
with the same normaliser and jiwer path as ``omni-ds eval``.
"""

from __future__ import annotations

import torch

from omni_ds.dist import gather_objects
from omni_ds.eval.wer import score_set
from omni_ds.model.decode import ctc_greedy


@torch.no_grad()
def dev_scores(engine, dev_sets: dict, tokenizer, max_batches: int = 0) -> dict[str, dict]:
    """``{set name: {"loss", "wer", "utterances"}}`` (complete on rank 0; every rank calls it)."""
    model = engine.module
    device = next(model.parameters()).device
    engine.eval()
    results = {}
    for name, loader in dev_sets.items():
        nll, tokens, refs, hyps = 0.0, 0, [], []
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            out = engine(batch["audio"].to(device), batch["audio_lens"].to(device))
            token_lens = batch["token_lens"].to(device)
            loss = model.loss(out, batch["tokens"].to(device), token_lens)
            n = int(token_lens.sum())
            nll += float(loss.ctc) * n
            tokens += n
            refs += list(batch["texts"])
            # Ids past the tokenizer (model.vocab_size may be larger) are never targets; an
            # untrained model can still emit them.
            for ids in ctc_greedy(out.logits.float(), out.out_lens):
                hyps.append(tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]))
        gathered = gather_objects((nll, tokens, refs, hyps))
        total_nll = sum(g[0] for g in gathered)
        total_tokens = sum(g[1] for g in gathered)
        all_refs = [r for g in gathered for r in g[2]]
        all_hyps = [h for g in gathered for h in g[3]]
        score = score_set(all_refs, all_hyps) if all_refs else None
        results[name] = {
            "loss": total_nll / max(total_tokens, 1),
            "wer": score.wer if score is not None else float("nan"),
            "utterances": len(all_refs),
        }
    engine.train()
    return results
