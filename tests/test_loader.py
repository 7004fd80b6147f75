"""The training loader on real shards: equal steps on every rank, each sample once per epoch,
exact resume on any world size and worker count, bad data skipped and counted, signals ignored."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing.forkserver
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import child_pythonpath, run_function, start_command

from data_pipeline.config import DataConfig
from data_pipeline.index import index_directory, load_index
from data_pipeline.loader import SpeechLoader
from data_pipeline.plan import Catalog, apply_filters, plan_epoch
from data_pipeline.shards import write_shard
from data_pipeline.synth import splits, utterance
from data_pipeline.tokenizer import Tokenizer, train_tokenizer

SPLIT = splits(120)[0]


def config(directory: Path, **kw) -> DataConfig:
    base = dict(train=[directory], max_duration=5.0, max_batch_seconds=10.0, num_buckets=3)
    return DataConfig(**{**base, **kw})


def write_corpus(out: Path, sizes: tuple[int, ...], split=SPLIT, pl_noise: float = 0.2,
                 vocab: int = 64) -> Path:  # fmt: skip
    """Shards of ``sizes`` synthetic utterances of ``split`` in ``out``, indexed, with
    ``out/tokenizer.model``."""
    first = 0
    for k, n in enumerate(sizes):
        write_shard(
            out / f"shard-{k:06d}.tar",
            (utterance(split, i, 0, pl_noise) for i in range(first, first + n)),
        )
        first += n
    index_directory(out)
    train_tokenizer([out], out / "tokenizer", vocab)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3 shards of 12, 10 and 8 synthetic utterances (0.9–3.3 s), written by the shard writer."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), (12, 10, 8))


def all_keys(directory: Path) -> list[str]:
    return [row[0] for s in load_index(directory).shards for row in s["samples"]]


def take(loader: SpeechLoader, limit: int | None = None) -> list[tuple[int, list[str]]]:
    """(bucket, keys) of up to ``limit`` batches; the loader's state then stands after them."""
    out, it = [], iter(loader)
    for batch in it:
        out.append((batch["bucket"], batch["keys"]))
        if limit is not None and len(out) == limit:
            it.close()
            break
    return out


def test_batches_follow_the_contract(corpus):
    tok = Tokenizer(corpus / "tokenizer.model")
    cfg = config(corpus, num_workers=2)
    batches = list(SpeechLoader(cfg, tok, seed=3))
    assert sum(len(b["keys"]) for b in batches) == 30
    for b in batches:
        n, longest = len(b["keys"]), int(b["audio_lens"].max())
        assert b["audio"].dtype == torch.float32 and b["audio"].shape == (n, longest)
        assert b["tokens"].dtype == b["token_lens"].dtype == b["audio_lens"].dtype == torch.int64
        assert n * longest <= cfg.max_batch_seconds * 16000
        for i in range(n):
            assert not b["audio"][i, b["audio_lens"][i] :].any()
            assert b["audio"][i, : b["audio_lens"][i]].abs().max() > 0.01
            assert not b["tokens"][i, b["token_lens"][i] :].any()
            assert tok.decode(b["tokens"][i, : b["token_lens"][i]].tolist()) == b["texts"][i]


def _rank_epochs(corpus: Path) -> list[list[tuple[int, list[str]]]]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    loader = SpeechLoader(config(corpus, num_workers=2), rank=rank, world_size=world, seed=1)
    return [take(loader), take(loader)]


@pytest.mark.distributed
def test_two_ranks_two_workers_three_shards(corpus):
    ranks = run_function(_rank_epochs, nprocs=2, args=(corpus,))
    keys = sorted(all_keys(corpus))
    for epoch in range(2):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(b) > 1
        assert [bucket for bucket, _ in a] == [bucket for bucket, _ in b]
        seen = [k for _, batch in a + b for k in batch]
        assert sorted(seen) == keys
    assert ranks[0][0] != ranks[0][1]  # a new order every epoch


def test_equal_steps_whatever_the_shard_count(corpus):
    index = load_index(corpus)
    for n_shards in (1, 2, 3):
        sub = dataclasses.replace(index, shards=index.shards[:n_shards])
        catalog = Catalog.from_sets([sub])
        for world in (1, 2, 3, 4, 5, 7):
            cfg = config(corpus, max_batch_size=3)
            kept, _ = apply_filters(catalog, cfg)
            plan = plan_epoch(kept, catalog.seconds, cfg, 0, 0, [[world, 0]])
            assert all(len(step) == world for step in plan.steps)
            placed = [i for step in plan.steps for batch in step for i in batch]
            assert sorted(placed + plan.dropped) == list(range(len(catalog)))
            assert len(set(placed)) == len(placed)
            assert not plan.dropped or len(catalog) < world
            for step in plan.steps:
                for batch in step:
                    longest = max(catalog.seconds[batch])
                    assert 1 <= len(batch) <= 3 and longest * len(batch) <= cfg.max_batch_seconds


def _run(
    loaders: list[SpeechLoader], steps: int | None = None
) -> list[list[tuple[int, list[str]]]]:
    return [take(loader, steps) for loader in loaders]


def _loaders(
    corpus: Path, world: int, workers: int, state: dict | None = None
) -> list[SpeechLoader]:
    cfg = config(corpus, num_workers=workers, max_batch_size=4)
    loaders = [SpeechLoader(cfg, rank=r, world_size=world, seed=5) for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    return loaders


def test_exact_resume_same_world_size(corpus):
    full = _run(_loaders(corpus, 2, 0))
    k = random.Random(0).randrange(1, len(full[0]))
    first = _loaders(corpus, 2, 2)
    _run(first, k)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1]
    rest = _run(_loaders(corpus, 2, 2, states[0]))
    assert [r[:k] + s for r, s in zip(full, rest)] == full


def test_state_after_the_last_batch_starts_the_next_epoch(corpus):
    # A trainer checkpoints right after a step, before asking for the batch that ends the epoch.
    loaders = _loaders(corpus, 2, 0)
    epoch0 = _run(loaders, len(loaders[0]))
    state = loaders[0].state_dict()
    assert state["epoch"] == 1
    resumed = _run(_loaders(corpus, 2, 0, state))
    fresh = _loaders(corpus, 2, 0)
    _run(fresh)
    assert resumed == _run(fresh) != epoch0


@pytest.mark.parametrize("hops", [(2, 3), (2, 1), (3, 2, 1)])
def test_resume_on_other_world_sizes_and_worker_counts(corpus, hops):
    rng = random.Random(sum(hops))
    seen: list[str] = []
    state = None
    for hop, world in enumerate(hops):
        loaders = _loaders(corpus, world, workers=hop % 2 * 2, state=state)
        remaining = len(loaders[0])
        assert all(len(loader) == remaining for loader in loaders)
        last = hop == len(hops) - 1
        steps = None if last else rng.randrange(1, remaining)
        runs = _run(loaders, steps)
        assert len({len(r) for r in runs}) == 1 and len({tuple(b for b, _ in r) for r in runs}) == 1
        seen += [k for r in runs for _, keys in r for k in keys]
        state = loaders[0].state_dict()
    assert sorted(seen) == sorted(all_keys(corpus))
    assert state["epoch"] == 1


def _bytes_of(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _children(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            found |= set(map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split()))
    return found


def _signal_fork_server_and_workers(stop: threading.Event) -> None:
    """SIGUSR1 and SIGTERM, every millisecond, to the fork server and every process it forked:
    what SLURM's preemption does to every process of a step, at any moment of a worker's life."""
    while not stop.is_set():
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        for pid in {server, *_children(server)} if server else ():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        time.sleep(0.001)


def test_workers_ignore_stop_signals_from_their_first_instant(corpus):
    loader = SpeechLoader(config(corpus, num_workers=2, max_batch_size=2), seed=0)
    stop = threading.Event()
    signaller = threading.Thread(target=_signal_fork_server_and_workers, args=(stop,))
    signaller.start()
    try:
        # Each epoch starts new workers from the same server, all of them under fire; with only
        # SIG_IGN inherited, torch's worker SIGTERM handler killed both workers of every epoch.
        for _ in range(3):
            assert sum(len(b["keys"]) for b in loader) == 30
    finally:
        stop.set()
        signaller.join()


STARTING_SERVER = """
import multiprocessing.forkserver, os, signal
from data_pipeline import workers
seen = []
signal.signal(signal.SIGTERM, lambda *_: seen.append("SIGTERM"))
real = multiprocessing.forkserver.ensure_running
def ensure_running():  # SLURM's SIGTERM, arriving while the fork server starts
    os.kill(os.getpid(), signal.SIGTERM)
    real()
multiprocessing.forkserver.ensure_running = ensure_running
workers._ensure_fork_server()
print(seen, signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN,
      signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


def test_a_stop_signal_while_the_fork_server_starts_reaches_the_trainer():
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    out = subprocess.run([sys.executable, "-c", STARTING_SERVER], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.split("\n")[0] == "['SIGTERM'] True set()"


ABANDON = """
import sys
import threading
import time
from pathlib import Path
from data_pipeline.config import DataConfig
from data_pipeline.loader import SpeechLoader
cfg = DataConfig(train=[Path(sys.argv[1])], max_duration=4.0, max_batch_seconds=4.0, num_workers=2)
batches = iter(SpeechLoader(cfg))
next(batches)
sys.exit(75)  # as the trainer does after a stop signal, mid-epoch, iterator still referenced
"""


def test_exit_mid_epoch_is_not_held_up_by_workers(corpus):
    # Workers ignore SIGTERM, which multiprocessing's exit handler relies on to end them.
    with start_command([sys.executable, "-c", ABANDON, str(corpus)], nprocs=1) as group:
        (result,) = group.wait(timeout=60, check=False)
    assert result.returncode == 75, result.stderr


def test_config_errors_name_key_value_and_fix(corpus):
    from omni_ds.config.experiment import ExperimentConfig
    from omni_ds.config.loading import from_dict
    from omni_ds.errors import ConfigError

    with pytest.raises(ValueError, match=r"data\.max_batch_seconds: 2\.0 .*max_duration"):
        DataConfig(max_batch_seconds=2.0, max_duration=5.0)
    with pytest.raises(ValueError, match=r"data\.num_workers: -1 .*use 0"):
        DataConfig(num_workers=-1)
    with pytest.raises(
        ConfigError, match="data.min_pl_confidance: unknown key; did you mean 'min_pl_confidence'"
    ):
        from_dict(ExperimentConfig, {"data": {"min_pl_confidance": 0.5}})
    cfg = from_dict(ExperimentConfig, {"data": {"train": [str(corpus)], "dev": {"a": str(corpus)}}})
    assert cfg.data.train == [str(corpus)] and cfg.data.dev == {"a": str(corpus)}
