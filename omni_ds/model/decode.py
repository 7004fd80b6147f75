"""CTC decoding: greedy (best path) and prefix beam search, on the encoder's logits.

Both take ``logits [B, T, V+1]`` (blank = the last index, as the model emits it) and ``out_lens
[B]`` valid frames per utterance, and return token ids (SentencePiece ids) per utterance.

Greedy takes the most likely symbol per frame, merges repeats and drops blanks. Prefix beam
search keeps the ``beam_size`` most probable *label prefixes*, summing over all alignments
that collapse to each one (a prefix's probability is split into "ends in blank" and "ends in a
label", so that ``a a`` can only extend to ``aa`` through a blank). Per frame only the
``token_topk`` most probable symbols are tried (default: ``beam_size``), which bounds the cost at
``T * beam_size * token_topk``; with no pruning (both limits at least the number of prefixes and
``V+1``) the scores are the exact CTC log-probabilities of the label sequences.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

NEG_INF = float("-inf")


def ctc_greedy(logits: torch.Tensor, out_lens: torch.Tensor) -> list[list[int]]:
    """Best-path decoding: argmax per frame, merge repeats, drop blanks."""
    blank = logits.shape[-1] - 1
    best = logits.argmax(dim=-1).cpu()
    hyps = []
    for path, n in zip(best, out_lens.tolist()):
        path = torch.unique_consecutive(path[:n])
        hyps.append([int(t) for t in path if t != blank])
    return hyps


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def prefix_beam_search(
    log_probs: np.ndarray, beam_size: int = 8, token_topk: int | None = None
) -> list[tuple[tuple[int, ...], float]]:
    """The ``beam_size`` best label sequences of one utterance with their CTC log-probabilities.

    ``log_probs [T, V+1]`` are log-softmax outputs of the valid frames; blank is the last column.
    The result is sorted, most probable first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    num_symbols = log_probs.shape[1]
    blank = num_symbols - 1
    topk = min(num_symbols, token_topk or beam_size)
    # prefix -> [log P(prefix, ends in blank), log P(prefix, ends in a label)]
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    for frame in log_probs:
        candidates = (
            np.argpartition(-frame, topk - 1)[:topk] if topk < num_symbols else range(num_symbols)
        )
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (p_b, p_nb) in beams.items():
            p_total = _logaddexp(p_b, p_nb)
            last = prefix[-1] if prefix else None
            for c in candidates:
                c = int(c)
                p = float(frame[c])
                if c == blank:
                    entry = nxt[prefix]
                    entry[0] = _logaddexp(entry[0], p_total + p)
                elif c == last:
                    # the repeat extends the prefix only after a blank, else it merges into it
                    extended = nxt[(*prefix, c)]
                    extended[1] = _logaddexp(extended[1], p_b + p)
                    same = nxt[prefix]
                    same[1] = _logaddexp(same[1], p_nb + p)
                else:
                    extended = nxt[(*prefix, c)]
                    extended[1] = _logaddexp(extended[1], p_total + p)
        # a repeat reached without a blank leaves an impossible (-inf) prefix behind: drop it
        scored = [(_logaddexp(*p), prefix, p) for prefix, p in nxt.items()]
        scored = sorted((s for s in scored if s[0] > NEG_INF), key=lambda s: s[0], reverse=True)
        beams = {prefix: p for _, prefix, p in scored[:beam_size]}
    return [(prefix, _logaddexp(*p)) for prefix, p in beams.items()]


def ctc_beam_search(
    logits: torch.Tensor, out_lens: torch.Tensor, beam_size: int = 8, token_topk: int | None = None
) -> list[list[int]]:
    """The most probable label sequence of each utterance by :func:`prefix_beam_search`."""
    log_probs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
    hyps = []
    for lp, n in zip(log_probs, out_lens.tolist()):
        best, _ = prefix_beam_search(lp[:n], beam_size, token_topk)[0]
        hyps.append(list(best))
    return hyps
