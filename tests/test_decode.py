"""CTC greedy and prefix beam search, checked against brute-force enumeration of alignments."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from omni_ds.model.decode import ctc_beam_search, ctc_greedy, prefix_beam_search


def collapse(path, blank):
    out = []
    prev = None
    for s in path:
        if s != prev and s != blank:
            out.append(s)
        prev = s
    return tuple(out)


def brute_force(log_probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """Exact log P(labels) by summing over every alignment (T^(V+1) paths; tiny inputs only)."""
    T, S = log_probs.shape
    totals: dict[tuple[int, ...], list[float]] = {}
    for path in itertools.product(range(S), repeat=T):
        lp = sum(log_probs[t, s] for t, s in enumerate(path))
        totals.setdefault(collapse(path, S - 1), []).append(lp)
    return {k: float(np.logaddexp.reduce(v)) for k, v in totals.items()}


def random_log_probs(rng, T, S, sharp=1.0):
    x = rng.normal(size=(T, S)) * sharp
    return x - np.logaddexp.reduce(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(6))
def test_unpruned_beam_search_is_exact(seed):
    rng = np.random.default_rng(seed)
    T, S = 5, 4  # 3 labels + blank: 1024 alignments
    lp = random_log_probs(rng, T, S, sharp=2.0)
    exact = brute_force(lp)
    beams = prefix_beam_search(lp, beam_size=10_000, token_topk=S)
    assert len(beams) == len(exact)
    for prefix, score in beams:
        assert score == pytest.approx(exact[prefix], abs=1e-9)
    assert beams[0][0] == max(exact, key=exact.get)
    # the label-sequence probabilities sum to one
    assert math.fsum(math.exp(s) for _, s in beams) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(10))
def test_small_beam_finds_the_best_sequence(seed):
    rng = np.random.default_rng(100 + seed)
    lp = random_log_probs(rng, 6, 4, sharp=3.0)
    exact = brute_force(lp)
    beams = prefix_beam_search(lp, beam_size=8)
    best, score = beams[0]
    assert best == max(exact, key=exact.get)
    # pruning drops alignments through discarded prefixes, so scores are lower bounds
    assert score <= exact[best] + 1e-9
    assert score > exact[best] - 0.5


def test_beam_beats_greedy_where_alignments_add_up():
    # frame-wise best path is "blank blank" (0.36), but label 0 has two alignments summing to
    # 2 * 0.6 * 0.4 + 0.4 * 0.4 = 0.64 > 0.36
    p = np.array([[0.4, 0.6], [0.4, 0.6]])
    logits = torch.tensor(np.log(p))[None]
    lens = torch.tensor([2])
    assert ctc_greedy(logits, lens) == [[]]
    assert ctc_beam_search(logits, lens, beam_size=4) == [[0]]
    assert prefix_beam_search(np.log(p), 4)[0][1] == pytest.approx(math.log(0.64))


def test_greedy_batched_with_lengths():
    blank = 3
    paths = [[0, 0, blank, 0, 1, 1, 2], [2, blank, 2, 2, 1, 1, 1]]
    logits = torch.full((2, 7, 4), -5.0)
    for b, path in enumerate(paths):
        for t, s in enumerate(path):
            logits[b, t, s] = 5.0
    lens = torch.tensor([7, 4])  # the second utterance's last 3 frames are padding
    assert ctc_greedy(logits, lens) == [[0, 0, 1, 2], [2, 2]]
    assert ctc_beam_search(logits, lens, beam_size=4) == [[0, 0, 1, 2], [2, 2]]


def test_repeated_label_needs_blank():
    lp = np.log(np.array([[0.9, 0.1], [0.9, 0.1]]))
    scores = dict(prefix_beam_search(lp, beam_size=10, token_topk=2))
    assert (0, 0) not in scores  # "a a" without a blank collapses to "a"
    assert scores[(0,)] == pytest.approx(math.log(0.9 * 0.9 + 0.9 * 0.1 + 0.1 * 0.9))
