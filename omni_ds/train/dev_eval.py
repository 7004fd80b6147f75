"""Periodic dev evaluation during training: CTC loss and greedy-decoding WER per dev set.

Every rank decodes its own share of each dev set (``data_pipeline.ordered`` gives every rank the
same number of batches, which the MoE all-to-all needs, padding with filler batches that run the
forward but are left out of the loss and the WER); transcripts are gathered on rank 0, which
scores them with the same normaliser and jiwer path as ``omni-ds eval``.

The scores are a function of the weights alone: each pass reads the same batches in the same
order (an ``OrderedReader`` keeps no epoch counter or other state between passes), in eval mode
(no dropout, SpecAugment or routing noise), so a resumed run's dev loss equals the uninterrupted
run's exactly, however many evaluations either process ran before (``tests/test_train.py``).
"""

from __future__ import annotations

import torch

from data_pipeline.reader import FILLER_KEY
from omni_ds.dist import gather_objects
from omni_ds.eval.wer import score_set
from omni_ds.model.decode import ctc_greedy


@torch.no_grad()
def dev_scores(engine, dev_sets: dict, tokenizer, max_batches: int = 0) -> dict[str, dict]:
    """``{set name: {"loss", "wer", "utterances", "skipped"}}`` (complete on rank 0; every rank
    calls it); ``skipped`` counts the unusable dev samples left out."""
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
            if batch["keys"] == [FILLER_KEY]:  # only there to keep the ranks in step
                continue
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
        skipped = sum(n for reason, n in loader.skipped().items() if reason != "filler_batches")
        gathered = gather_objects((nll, tokens, refs, hyps, skipped))
        total_nll = sum(g[0] for g in gathered)
        total_tokens = sum(g[1] for g in gathered)
        all_refs = [r for g in gathered for r in g[2]]
        all_hyps = [h for g in gathered for h in g[3]]
        score = score_set(all_refs, all_hyps) if all_refs else None
        results[name] = {
            "loss": total_nll / max(total_tokens, 1),
            "wer": score.wer if score is not None else float("nan"),
            "utterances": len(all_refs),
            "skipped": sum(g[4] for g in gathered),
        }
    engine.train()
    return results
