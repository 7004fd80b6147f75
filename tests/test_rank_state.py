"""Per-rank state through a reshard: every rank's tallies carry over, summed once; the rest of the
state (the same on every rank) comes through unchanged, and the loaders resume on the new layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.index import index_directory
from data_pipeline.loader import SpeechLoader
from data_pipeline.shards import write_shard
from data_pipeline.synth import splits, utterance
from omni_ds.ckpt.rank_state import TALLIES, reshard_rank_states
from omni_ds.train.trainer import Counters

SPLIT = splits(120)[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_shard(out / "shard-000000.tar", (utterance(SPLIT, i, 0, 0.2) for i in range(24)))
    index_directory(out)
    return out


def loaders(corpus: Path, world: int) -> list[SpeechLoader]:
    # max_duration below some utterances' length: the filter's skips are per-rank tallies.
    cfg = DataConfig(train=[corpus], max_duration=2.5, max_batch_seconds=5.0, num_buckets=2,
                     max_batch_size=2, num_workers=0)  # fmt: skip
    return [SpeechLoader(cfg, rank=r, world_size=world, seed=3) for r in range(world)]


def test_tallies_are_summed_once_and_the_rest_is_kept(corpus):
    old = loaders(corpus, 2)
    counters = [Counters(), Counters()]
    seen = []
    for loader, c in zip(old, counters):
        for i, batch in enumerate(loader):
            seen += batch["keys"]
            c.step, c.nonfinite_skipped = i + 1, 1
            c.samples += len(batch["keys"])
            c.audio_seconds += 1.5
            if i == 1:
                break
    states = [{"counters": c.state_dict(), "loader": loader.state_dict()}
              for c, loader in zip(counters, old)]  # fmt: skip
    assert all(TALLIES in s["counters"] and TALLIES in s["loader"] for s in states)

    new = reshard_rank_states(states, 3)
    resumed = loaders(corpus, 3)
    fresh = [Counters() for _ in range(3)]
    for state, loader, c in zip(new, resumed, fresh):
        loader.load_state_dict(state["loader"])
        c.load_state_dict(state["counters"])
    assert sum(c.samples for c in fresh) == sum(c.samples for c in counters) == len(seen)
    assert sum(c.audio_seconds for c in fresh) == 6.0
    assert [c.step for c in fresh] == [2, 2, 2]
    assert [c.nonfinite_skipped for c in fresh] == [1, 1, 1]  # equal on every rank: not summed

    def skipped(group):
        total: dict[str, int] = {}
        for loader in group:
            for k, v in loader.skipped().items():
                total[k] = total.get(k, 0) + v
        return total

    assert skipped(resumed) == skipped(old) and skipped(old).get("too_long", 0) > 0
    rest = [k for loader in resumed for batch in loader for k in batch["keys"]]
    assert len(rest) + len(seen) == len(set(rest) | set(seen))  # nothing twice
