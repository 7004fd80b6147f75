"""Starting an epoch with loader workers leaves the trainer's global RNGs alone: dropout,
SpecAugment and CAPE draw from them, and exact resume needs their stream to be the model's own."""

from __future__ import annotations

import random

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.index import index_directory
from data_pipeline.loader import SpeechLoader
from data_pipeline.shards import write_shard
from data_pipeline.synth import splits, utterance


def test_epochs_with_workers_draw_nothing_from_the_global_rngs(tmp_path):
    write_shard(tmp_path / "shard-000000.tar",
                (utterance(splits(120)[0], i, 0, 0.2) for i in range(8)))  # fmt: skip
    index_directory(tmp_path)
    cfg = DataConfig(train=[tmp_path], max_duration=5.0, max_batch_seconds=5.0, num_buckets=1,
                     num_workers=1)  # fmt: skip
    loader = SpeechLoader(cfg, seed=1)
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for _ in range(2):  # two epochs: each starts a DataLoader iterator
        assert sum(len(b["keys"]) for b in loader) == 8
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
